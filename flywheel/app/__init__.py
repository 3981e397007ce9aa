"""The app layer: the `flywheel` CLI, `flywheel up` and the demo. It sits above bot/, gateway/,
trainer/ and store/ and imports them; nothing below imports it (tests/test_layers.py)."""
