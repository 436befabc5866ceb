"""The date parts of RFC 5260 (the `date` and `currentdate` tests).

A date header is read with email.utils' RFC 5322 parser (imported when a script asks); one
that cannot be read gives no value, so the test is false.  Without `:zone` or
`:originalzone` a date is shown in this machine's local zone, as Pigeonhole does.
"""

from __future__ import annotations

import datetime as dt

PARTS = ("year", "month", "day", "date", "julian", "hour", "minute", "second", "time", "iso8601", "std11",
         "zone", "weekday")
_MJD_EPOCH = dt.date(1858, 11, 17)
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def valid_zone(text: str) -> bool:
    """`+hhmm` or `-hhmm`, as :zone takes it."""
    return (len(text) == 5 and text[0] in "+-" and text[1:].isdigit() and int(text[1:3]) <= 23
            and int(text[3:]) <= 59)


def _zone(text: str) -> dt.timezone:
    minutes = int(text[1:3]) * 60 + int(text[3:])
    return dt.timezone(dt.timedelta(minutes=-minutes if text[0] == "-" else minutes))


def parse_header(value: str) -> dt.datetime | None:
    """An RFC 5322 date-time, with its own zone; None when it cannot be read."""
    from email.utils import parsedate_tz

    try:
        parts = parsedate_tz(value)
        if parts is None:
            return None
        offset = parts[9] if parts[9] is not None else 0
        return dt.datetime(*parts[:6], tzinfo=dt.timezone(dt.timedelta(seconds=offset)))
    except (ValueError, OverflowError, TypeError):
        return None


def in_zone(moment: dt.datetime, zone: str | None, original: bool) -> dt.datetime:
    if original:
        return moment
    if zone is not None:
        return moment.astimezone(_zone(zone))
    return moment.astimezone()  # the local zone


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def part(moment: dt.datetime, name: str) -> str:
    offset = moment.utcoffset() or dt.timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    zone = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    values = {
        "year": f"{moment.year:04d}", "month": f"{moment.month:02d}", "day": f"{moment.day:02d}",
        "date": f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}",
        "julian": str((moment.date() - _MJD_EPOCH).days),
        "hour": f"{moment.hour:02d}", "minute": f"{moment.minute:02d}", "second": f"{moment.second:02d}",
        "time": f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}",
        "zone": zone, "weekday": str((moment.weekday() + 1) % 7),
    }
    if name in values:
        return values[name]
    if name == "iso8601":
        suffix = "Z" if minutes == 0 else f"{zone[:3]}:{zone[3:]}"
        return f"{values['date']}T{values['time']}{suffix}"
    # std11
    return (f"{_DAYS[moment.weekday()]}, {moment.day:02d} {_MONTHS[moment.month - 1]} {moment.year:04d} "
            f"{values['time']} {zone}")
