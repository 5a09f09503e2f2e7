"""The archive: every event in ClickHouse, acknowledged after its receipt, and read back."""
