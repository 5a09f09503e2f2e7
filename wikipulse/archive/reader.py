"""Reading the archive from another process: through the running archiver's read-only endpoint, else ClickHouse."""

from __future__ import annotations

from wikipulse.core.errors import OperatorError
from wikipulse.core.settings import ArchiveSettings


class ArchiveNotRunning(OperatorError):
    """No archiver answers queries and no ClickHouse server is configured (a reader that may not open the directory)."""


def archive_query(settings: ArchiveSettings, sql: str, embedded: bool = True) -> bytes:
    """A read-only statement's rows as JSON lines. While the archiver runs it holds the embedded engine (one
    process at a time), so the query goes to its endpoint on 127.0.0.1; otherwise straight to ClickHouse.
    `embedded=False` (a long-running reader: the History page) never opens the embedded directory itself, which
    would keep the archiver from it: with no archiver listening, ArchiveNotRunning."""
    from wikipulse.archive.table import Archive, ArchiveUnavailable, check_read_only, connect, json_lines

    statement = check_read_only(sql)
    if not settings.clickhouse_url:
        answer = _ask_archiver(settings.archive_port, statement)
        if answer is not None:
            return answer
        if not embedded:
            raise ArchiveNotRunning(
                f"no archiver answers on 127.0.0.1:{settings.archive_port} (ARCHIVE_PORT) and no CLICKHOUSE_URL is set"
            )
    try:
        archive = Archive(connect(settings))
    except ArchiveUnavailable as exc:
        raise OperatorError(f"the archive cannot be opened: {exc}") from None
    try:
        return json_lines(*archive.query(statement))
    finally:
        archive.close()


ARCHIVER_TIMEOUT = 60.0  # seconds `sql` and `history` wait for the archiver's answer


def _ask_archiver(port: int, statement: str) -> bytes | None:
    """The archiver's answer, or None when no archiver listens (then the caller opens the archive itself)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/query", data=statement.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=ARCHIVER_TIMEOUT) as response:
            return bytes(response.read())
    except TimeoutError:
        raise OperatorError(f"the archiver on 127.0.0.1:{port} did not answer within {ARCHIVER_TIMEOUT:g} s (a slow query?)") from None
    except urllib.error.HTTPError as failure:
        with failure:
            raise OperatorError(failure.read().decode(errors="replace")[:500]) from None
    except (urllib.error.URLError, ConnectionError):
        return None
