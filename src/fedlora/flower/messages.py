"""What travels in a message: global arrays down, uploads up, the round plan as JSON. Nothing else.

A client's kept state (FedSA's B and local head, its DP step count) lives in the node's
``Context.state`` under :data:`STATE_KEY` and is never put into a message. (Imports torch: the
ClientApp process itself does not import this module, see ``node.py``.)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedlora.config import ExperimentConfig, build_config
from fedlora.federation.client import ClientState
from fedlora.methods.base import RoundPlan, State

STATE_KEY = "fedlora.client"  # node-local: Context.state[STATE_KEY] (arrays) and [STATE_KEY + ".steps"]
RUN_CONFIG_KEYS = ("config-yaml", "run-dir", "min-clients", "round-timeout", "node-wait")


def to_record(state: State) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def from_record(record: ArrayRecord, device: torch.device | str = "cpu") -> State:
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)).to(device) for k, a in record.items()}


def plan_to_config(plan: RoundPlan) -> ConfigRecord:
    return ConfigRecord({
        "round": plan.round,
        "trainable": json.dumps(sorted(plan.trainable)),
        "download": json.dumps(list(plan.download)),
        "groups": json.dumps({k: sorted(v) for k, v in plan.groups.items()}),
        "info": json.dumps(plan.info),
    })


def plan_from_config(record: ConfigRecord) -> RoundPlan:
    return RoundPlan(int(record["round"]), frozenset(json.loads(str(record["trainable"]))),
                     tuple(json.loads(str(record["download"]))), json.loads(str(record["info"])),
                     {k: frozenset(v) for k, v in json.loads(str(record["groups"])).items()})


def config_from_run(run_config: dict[str, Any]) -> ExperimentConfig:
    """The fedlora config carried in Flower's run config (key ``config-yaml``: the YAML text)."""
    from fedlora.errors import ConfigError  # noqa: PLC0415

    text = run_config.get("config-yaml")
    if not text:
        raise ConfigError("Flower run config has no 'config-yaml'; start the run with `fedlora flower up` or "
                          "`fedlora flower sim`, or pass --run-config with config-yaml set to a fedlora config's text")
    return build_config(yaml.safe_load(str(text)))


def load_client_state(state: RecordDict, init_local: State) -> ClientState:
    """The node's kept state (its ``Context.state``), or the initial one on its first round."""
    if STATE_KEY not in state:
        return ClientState({k: v.clone() for k, v in init_local.items()})
    local = from_record(state[STATE_KEY])
    steps = int(state[STATE_KEY + ".steps"]["dp_steps"])
    return ClientState({k: v.to(init_local[k].device) for k, v in local.items()}, steps)


def save_client_state(state: RecordDict, client: ClientState) -> None:
    state[STATE_KEY] = to_record(client.local)
    state[STATE_KEY + ".steps"] = ConfigRecord({"dp_steps": client.dp_steps})
