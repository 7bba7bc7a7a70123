"""Codec of the entries of a job's event stream (`keys.events`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import orjson

from common.jobs import Job


class EventType(StrEnum):
    token = "token"
    done = "done"
    error = "error"

    @property
    def terminal(self) -> bool:
        return self is not EventType.token


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: EventType
    data: str


def final_fields(job: Job) -> tuple[str, str]:
    """The closing event's type and data: `done` for a finished job, `error` for a failed one."""
    kind = EventType.error if job.error is not None else EventType.done
    return kind.value, job.model_dump_json()


def decode(entry_id: bytes | str, fields: dict[bytes, bytes]) -> Event:
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return Event(id=eid, type=EventType(fields[b"type"].decode()), data=fields[b"data"].decode())


def decode_job(event: Event) -> Job:
    return Job.model_validate(orjson.loads(event.data))
