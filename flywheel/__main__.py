from flywheel.app.cli import app

app(prog_name="flywheel")
