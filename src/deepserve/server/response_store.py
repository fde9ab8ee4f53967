"""Stored Responses API responses (``store: true``): in the ledger's database (shared by
every replica on it) or in this process (see ``responses``)."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import Any

from deepserve.errors import DeepserveError

MEMORY_RESPONSES = 1000
# Set by the gateway on requests it forwards: the API key that owns stored responses
# (a backend without keys of its own trusts it; tenants must not reach backends directly).
OWNER_HEADER = "x-deepserve-owner"


class ResponseStore:
    """Stored responses: in the ledger's database (``url``) or in memory."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, tuple[str | None, dict[str, Any]]] = OrderedDict()
        self._db: Any = None

    def _conn(self) -> Any:
        if self._db is None:
            from deepserve.billing.ledger_db import open_db

            self._db = open_db(self.url)  # type: ignore[arg-type]
        return self._db

    def put(self, key_id: str | None, response: dict[str, Any],
            messages: list[dict[str, Any]]) -> None:
        record = {"response": response, "messages": messages}
        with self._lock:
            if self.url is None:
                self._memory[response["id"]] = (key_id, record)
                while len(self._memory) > MEMORY_RESPONSES:
                    self._memory.popitem(last=False)
                return
            db = self._conn()
            try:
                db.execute("INSERT INTO responses (response_id, key_id, created_ts, model, "
                           "previous_response_id, body) VALUES (?, ?, ?, ?, ?, ?)",
                           (response["id"], key_id, time.time(), response["model"],
                            response.get("previous_response_id"),
                            json.dumps(record, ensure_ascii=False)))
                db.commit()
            except BaseException:
                db.rollback()
                raise

    def get(self, key_id: str | None, response_id: str) -> dict[str, Any] | None:
        """The stored record ({response, messages}) if this key may read it."""
        with self._lock:
            if self.url is None:
                found = self._memory.get(response_id)
                if found is None or found[0] != key_id:
                    return None
                return found[1]
            rows = self._conn().query("SELECT key_id, body FROM responses WHERE "
                                      "response_id = ?", (response_id,))
            self._db.commit()  # end the read transaction (PostgreSQL)
        if not rows or rows[0][0] != key_id:
            return None
        return json.loads(rows[0][1])

    def delete(self, key_id: str | None, response_id: str) -> bool:
        if self.get(key_id, response_id) is None:
            return False
        with self._lock:
            if self.url is None:
                self._memory.pop(response_id, None)
                return True
            db = self._conn()
            db.execute("DELETE FROM responses WHERE response_id = ?", (response_id,))
            db.commit()
        return True


def not_found(response_id: str) -> DeepserveError:
    return DeepserveError(f"Response with id {response_id!r} not found (it was not stored, "
                          "was deleted, or belongs to another API key)",
                          param="previous_response_id", status=404, code="not_found")
