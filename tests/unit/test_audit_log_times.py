"""The audit log's time column: one UTC text form, whatever form the envelope carried."""

from datetime import UTC, datetime, timedelta, timezone

from projections.audit_log import _utc_text


def test_times_become_utc_text_with_microseconds_and_that_form_is_kept_as_it_is():
    assert _utc_text("2026-11-21T02:22:03.493400Z") == "2026-11-21T02:22:03.493400Z"
    assert _utc_text("2026-11-21T02:22:03Z") == "2026-11-21T02:22:03.000000Z"
    assert _utc_text("2026-11-21T04:22:03.493400+02:00") == "2026-11-21T02:22:03.493400Z"
    assert _utc_text(datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))) == "2026-01-01T00:00:00.000000Z"
    now = datetime.now(UTC)
    assert _utc_text(now.isoformat().replace("+00:00", "Z")) == _utc_text(now)
