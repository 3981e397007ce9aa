"""Store settings: where the database lives. Read from the environment (FLYWHEEL_ prefix)."""
from pydantic_settings import BaseSettings, SettingsConfigDict


class StoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore")

    database_url: str = "sqlite:///./flywheel.db"
    # Seconds a SQLite writer waits for the lock before giving up (WAL allows one writer).
    sqlite_busy_timeout_s: float = 30.0
