"""Codec of the entries of a job's event stream (`keys.events`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import orjson
from pydantic import BaseModel

from common.schemas import Job, TokenEvent


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


StreamFields = dict[
    bytes | bytearray | memoryview | str | int | float,
    bytes | bytearray | memoryview | str | int | float,
]


def token_fields(event: TokenEvent) -> StreamFields:
    return _fields(EventType.token, event)


def final_fields(job: Job) -> StreamFields:
    """The closing event: `done` for a finished job, `error` for a failed one."""
    kind = EventType.error if job.error is not None else EventType.done
    return _fields(kind, job)


def _fields(kind: EventType, payload: BaseModel) -> StreamFields:
    return {"type": kind.value, "data": payload.model_dump_json()}


def decode(entry_id: bytes | str, fields: dict[bytes, bytes]) -> Event:
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return Event(id=eid, type=EventType(fields[b"type"].decode()), data=fields[b"data"].decode())


def decode_job(event: Event) -> Job:
    return Job.model_validate(orjson.loads(event.data))
