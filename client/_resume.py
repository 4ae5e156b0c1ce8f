"""`RemoteOptimizer`'s state_dict and load_state_dict: a framework's checkpoint holds a small
record naming a server checkpoint, and a resume brings the server back to it (docs/frameworks.md,
"Resuming from a framework's checkpoint")."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from optserve.client._client import ParameterServerClient
from optserve.client._forks import SwitchModel
from optserve.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied

log = logging.getLogger(__name__)


class Resume(SwitchModel):
    """Mixed into `RemoteOptimizer`, whose client, model, version and param groups these use."""

    client: ParameterServerClient
    model: str
    version: int
    trainer: str
    param_groups: list[dict[str, Any]]
    _last_checkpoint: tuple[str, int] | None

    if TYPE_CHECKING:

        def _wait_for_server(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """A small record for a framework's checkpoint: {"state": {}, "param_groups": [the
        groups' settings, "params" as indices], "optserve": {"address", "model", "version",
        "checkpoint", "trainer"}}. "checkpoint" names a server checkpoint written now, at
        "version" (None when the server has no checkpoint directory, or the token may not
        write one: the record then only says which version it was taken at)."""
        record: dict[str, Any] = {
            "address": self.client.address,
            "model": self.model,
            "version": self.version,
            "checkpoint": None,
            "trainer": self.trainer,
        }
        try:
            record["checkpoint"], record["version"] = self._checkpoint_for_record()
        except (FailedPrecondition, PermissionDenied) as exc:
            log.warning(
                "model %r: no server checkpoint for this state_dict (%s); a resume from it "
                "cannot bring the optimizer state back to version %d",
                self.model,
                exc,
                self.version,
            )
        index = 0
        groups = []
        for group in self.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            groups.append({**settings, "params": list(range(index, index + len(group["params"])))})
            index += len(group["params"])
        return {"state": {}, "param_groups": groups, "optserve": record}

    def _checkpoint_for_record(self) -> tuple[str, int]:
        """A server checkpoint of the model now: the one this optimizer wrote last if the model
        has not moved since (Accelerate, under the HF Trainer, calls state_dict() and
        load_state_dict() when it wraps an optimizer), else a new one."""
        last = self._last_checkpoint
        if last is not None and self.client.status(self.model, history=1).version == last[1]:
            return last
        written = self.client.checkpoint(self.model)
        self._last_checkpoint = (written.name, written.version)
        return self._last_checkpoint

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from a `state_dict()` record: bring the server's model back to the record's
        checkpoint (unless it already holds exactly that state, so that several trainers
        resuming restore it once), then load the weights and settings it holds; the param
        groups take the saved values, as torch's do (what differs from the server's, such as
        an lr a scheduler set after the last step, goes with the next step). Without a
        checkpoint in the record, the server's current state is kept: a warning says so when
        it is at another version than the record."""
        record = state_dict.get("optserve") if isinstance(state_dict, Mapping) else None
        if not isinstance(record, Mapping):
            raise InvalidArgument(
                "not a RemoteOptimizer state_dict (it has no 'optserve' record); a torch "
                "optimizer's state cannot be loaded into the server"
            )
        if record.get("model") != self.model:
            raise InvalidArgument(
                f"this state_dict is of model {record.get('model')!r}, not {self.model!r}"
            )
        if record.get("checkpoint"):
            self.client.restore(self.model, record["checkpoint"], unless_current=True)
        self._wait_for_server()
        # As torch does: the groups' values as saved (an lr a scheduler set after the last
        # step is in them, not yet on the server); the next step sends what differs.
        saved = {g.get("name"): g for g in state_dict.get("param_groups") or ()
                 if isinstance(g, Mapping)}  # fmt: skip
        for group in self.param_groups:
            values = saved.get(group["name"], {})
            group.update({k: v for k, v in values.items() if k not in ("params", "name")})
        if self.version != record.get("version"):
            why = (
                "the server has no checkpoint of that state (no checkpoint directory)"
                if not record.get("checkpoint")
                else "another trainer pushed after the restore"
            )
            warnings.warn(
                f"model {self.model!r} resumed at the server's version {self.version}, not at "
                f"the record's {record.get('version')}: {why}. The weights and optimizer state "
                f"are the server's at version {self.version}; the parameters now hold them.",
                stacklevel=2,
            )
