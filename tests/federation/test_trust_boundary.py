"""The privacy guarantee against the other parties: secure noise, what leaves a client, what a
node refuses, and what the server does with uploads it cannot trust."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedlora.config import build_config
from fedlora.errors import Refused
from fedlora.federation.client import poisson_batch, weaker_privacy
from fedlora.federation.noise_replay import clipped_step_sum
from fedlora.federation.simulation import Simulation
from fedlora.privacy.dpsgd import add_noise
from fedlora.privacy.noise import SeededNoise
from fedlora.seeds import generator
from tests.conftest import tiny_tree

ONE_STEP = {"num_clients": 2, "rounds": 1, "local_steps": 1, "min_client_size": 20}


def _one_step_sim(tiny_cfg, reproducible: bool, clipping: str = "flat") -> Simulation:
    """dp-lora, one local SGD step at lr 1: the upload minus the download is minus the privatised gradient."""
    cfg = tiny_cfg(federation=ONE_STEP, train={"lr": 1.0, "optimizer": "sgd", "momentum": 0.0},
                   privacy={"reproducible_noise": reproducible, "clipping": clipping}, eval={"diagnostics": False})
    return Simulation(cfg)


def _released_gradient(sim: Simulation, cid: int = 0) -> dict[str, torch.Tensor]:
    plan = sim.method.plan(sim.plan_context(1))
    download = {k: sim.global_state[k] for k in plan.download}
    node = sim.nodes[cid]
    upload = node.train(plan, download, commit=False).upload
    return {k: download[k] - upload[k] for k in upload}  # lr = 1: the privatised gradient itself


def _replay_attack(sim: Simulation, released: dict[str, torch.Tensor], cid: int = 0) -> float:
    """What a party holding the config can do: redraw the client's batch and 'its' noise from the seed and
    subtract the noise; returns the relative error of the recovered clipped sum against the true one."""
    spec, seed = sim.specs[cid], sim.cfg.train.seed
    rows = poisson_batch(len(spec.indices), spec.sample_rate, generator(seed, "client", cid, 1))
    active = sorted(released)
    sim.rt.adapted.load(sim.global_state)
    sim.rt.adapted.set_active(set(active))
    try:
        truth = clipped_step_sum(sim.rt, spec, rows, active)
    finally:
        sim.rt.adapted.set_active(set(sim.rt.adapted.params))
    dp = spec.dp
    zeros = {k: torch.zeros_like(v) for k, v in released.items()}
    replayed = add_noise(zeros, std=dp.noise_multiplier * dp.clip_norm,
                         noise=SeededNoise(generator(seed, "client", cid, 1, "noise")))
    recovered = {k: released[k] * dp.expected_batch_size - replayed[k] for k in released}
    err = sum((recovered[k] - truth[k]).pow(2).sum() for k in truth).sqrt()
    return float(err / sum(truth[k].pow(2).sum() for k in truth).sqrt())


def test_default_noise_cannot_be_replayed_from_the_config_and_never_repeats(tiny_cfg):
    sim = _one_step_sim(tiny_cfg, reproducible=False)
    first, second = _released_gradient(sim), _released_gradient(sim)
    assert not any(torch.equal(first[k], second[k]) for k in first)  # same config, same state: other noise
    assert _replay_attack(sim, first) > 0.5  # the noise is as large as the signal here: nothing is recovered


@pytest.mark.parametrize("clipping", ["flat", "per-group"])  # the replay clips as the client did, either way
def test_reproducible_noise_is_bit_identical_and_replayable_by_whoever_holds_the_config(tiny_cfg, clipping):
    sim = _one_step_sim(tiny_cfg, reproducible=True, clipping=clipping)
    first, second = _released_gradient(sim), _released_gradient(sim)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert _replay_attack(sim, first) < 1e-4  # the clipped gradient sum, exposed: why it is opt-in and labelled


def test_outputs_say_when_noise_is_reproducible(tiny_cfg):
    from fedlora.experiment import run_experiment

    summary = run_experiment(tiny_cfg(privacy={"reproducible_noise": True}, output={"name": "seeded"}), progress=False)
    assert "NOT private against anyone who holds the config" in summary["line"]
    assert summary["reproducible_noise"] is True
    run = summary["run_dir"]
    from pathlib import Path

    assert "NOT private against anyone who holds the config" in Path(run, "config.yaml").read_text()
    secure = run_experiment(tiny_cfg(privacy={"reproducible_noise": False}, output={"name": "secure"}), progress=False)
    assert "NOT private" not in secure["line"] and secure["reproducible_noise"] is False


def test_under_dp_nothing_unnoised_leaves_a_client(tiny_cfg):
    sim = _one_step_sim(tiny_cfg, reproducible=False)
    plan = sim.method.plan(sim.plan_context(1))
    res = sim.nodes[0].train(plan, {k: sim.global_state[k] for k in plan.download}, commit=False)
    assert math.isnan(res.loss) and res.examples == 0  # neither the loss nor the batch sizes
    record = sim.run_round(1)
    assert record["train_loss"] is None
    public = Simulation(tiny_cfg(federation=ONE_STEP, privacy={"enabled": False}))
    assert public.run_round(1)["train_loss"] is not None  # without DP there is nothing to protect


# ----------------------------------------------------------------------------- what a node refuses
def _fedsa(tiny_cfg, **fed) -> Simulation:
    return Simulation(tiny_cfg(method={"name": "fedsa-lora"}, federation={**ONE_STEP, **fed}))


def _snapshot(sim: Simulation, cid: int):
    return sim.rt.adapted.state(list(sim.rt.adapted.named)), {k: v.clone() for k, v in sim.nodes[cid].state.local.items()}


def _unchanged(sim, cid, before) -> bool:
    model, local = _snapshot(sim, cid)
    return all(torch.equal(model[k], before[0][k]) for k in model) and all(torch.equal(local[k], before[1][k]) for k in local)


def test_a_node_refuses_a_backbone_key_a_local_factor_a_reshaped_tensor_and_a_round_past_its_budget(tiny_cfg):
    sim = _fedsa(tiny_cfg)
    node = sim.nodes[0]
    plan = sim.method.plan(sim.plan_context(1))
    download = {k: sim.global_state[k] for k in plan.download}
    before = _snapshot(sim, 0)
    backbone = next(k for k in sim.rt.adapted.named if "embeddings" in k)
    local_b = next(k for k in sim.local_keys if ".lora_B." in k)
    a_key = next(k for k in download if ".lora_A." in k)
    cases = {
        "not a shared adapter tensor": (plan, {**download, backbone: sim.rt.adapted.named[backbone].detach() + 1}),
        "kept on the client": (plan, {**download, local_b: torch.ones_like(sim.init_local[local_b])}),
        "expected": (plan, {**download, a_key: torch.ones(1)}),  # would broadcast into every value
        "would upload": (dataclasses.replace(plan, download=(*plan.download, local_b)), download),  # B must stay local
    }
    for reason, (p, d) in cases.items():
        with pytest.raises(Refused, match=reason):
            node.train(p, d)
        assert _unchanged(sim, 0, before), reason
    node.train(plan, download)  # the budget: one round of one step
    spent = _snapshot(sim, 0)
    with pytest.raises(Refused, match="pass its privacy budget"):
        node.train(dataclasses.replace(plan, round=2), download)
    assert _unchanged(sim, 0, spent) and node.state.dp_steps == 1


def test_a_node_refuses_a_server_config_with_weaker_privacy(tiny_model_dir, tiny_csv, tmp_path):
    from fedlora.flower.node import node_run_config

    own = build_config(tiny_tree(tiny_model_dir, tiny_csv, tmp_path))
    path = tmp_path / "own.yaml"
    path.write_text(own.to_yaml())
    weaker = {"enabled": False}, {"epsilon": 30.0}, {"delta": 1e-2}, {"clip_norm": 50.0}
    for change in weaker:
        asked = build_config(tiny_tree(tiny_model_dir, tiny_csv, tmp_path, privacy=change))
        with pytest.raises(Refused, match="weaker than its own"):
            node_run_config({"config-yaml": asked.to_yaml()}, {"partition-id": 0, "config": str(path)})
    stronger = build_config(tiny_tree(tiny_model_dir, tiny_csv, tmp_path, privacy={"epsilon": 1.0}, federation={"rounds": 5}))
    ran = node_run_config({"config-yaml": stronger.to_yaml()}, {"partition-id": 0, "config": str(path)})
    assert ran.privacy == own.privacy and ran.federation.rounds == 5  # the node's privacy, the server's schedule
    path.write_text(build_config(tiny_tree(tiny_model_dir, tiny_csv, tmp_path, task={"prefix_cache_dir": "off"})).to_yaml())
    asks_disk = build_config(tiny_tree(tiny_model_dir, tiny_csv, tmp_path, task={"prefix_cache_dir": str(tmp_path / "c")}))
    ran = node_run_config({"config-yaml": asks_disk.to_yaml()}, {"partition-id": 0, "config": str(path)})
    assert ran.task.prefix_cache_dir == "off"  # the server cannot switch on a disk cache of the node's data
    assert weaker_privacy(own.privacy, stronger.privacy) is None


# ----------------------------------------------------------------------------- what the server does with uploads
def _corrupt(kind: str, upload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = sorted(upload)[0]
    bad = dict(upload)
    if kind == "nan":
        bad[key] = torch.full_like(upload[key], float("nan"))
    elif kind == "shape":
        bad[key] = torch.ones(1, dtype=upload[key].dtype)
    elif kind == "missing":
        del bad[key]
    elif kind == "dtype":
        bad[key] = upload[key].to(torch.float64)
    return bad


class Tampering:
    """A runner between the server and the clients that changes each round's outcome (a hostile network)."""

    def __init__(self, inner, change) -> None:
        self.inner, self.change = inner, change

    def train(self, plan, download, sampled):
        return self.change(self.inner.train(plan, download, sampled))

    def personal_accuracy(self, global_state):
        return self.inner.personal_accuracy(global_state)


def _wrap_runner(sim: Simulation, change) -> None:
    sim.server.runner = Tampering(sim.server.runner, change)


@pytest.mark.parametrize("kind", ["nan", "shape", "missing", "dtype"])
def test_a_corrupt_upload_drops_its_client_with_the_reason_and_the_round_goes_on(tiny_cfg, kind):
    cfg = tiny_cfg(federation={"num_clients": 3, "rounds": 2, "local_steps": 1}, eval={"diagnostics": False})
    attacked, reference = Simulation(cfg), Simulation(cfg)

    def corrupt(out):
        out.uploads = [_corrupt(kind, u) if c == 1 else u for c, u in zip(out.answered, out.uploads, strict=True)]
        return out

    def without(out):
        keep = [i for i, c in enumerate(out.answered) if c != 1]
        out.answered, out.uploads = [out.answered[i] for i in keep], [out.uploads[i] for i in keep]
        return out

    _wrap_runner(attacked, corrupt)
    _wrap_runner(reference, without)
    got, want = attacked.run(), reference.run()
    assert got.rounds_done == 2 and got.stop_reason is None
    for m in got.metrics:
        assert m["failed_clients"] == [1] and m["clients"] == [0, 2]
        assert any(f["client"] == 1 and f["reason"].startswith("upload rejected") for f in m["client_failures"])
    for k, v in want.global_state.items():
        assert torch.equal(got.global_state[k], v), k
    assert [r["steps"] for r in got.metrics[-1]["privacy"]] == [2, 2, 2]  # the rejected client's steps count


def test_the_flower_runner_charges_every_train_message_it_sent(monkeypatch):
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from fedlora.federation.server import ClientFacts
    from fedlora.flower.server_app import FlowerClients

    facts = [ClientFacts(c, 100, 1.0, 0.1, 10) for c in range(3)]
    runner = FlowerClients(grid=None, nodes={0: 10, 1: 11, 2: 12}, facts=facts, local_steps=4, round_timeout=1.0)
    answer = SimpleNamespace(content=RecordDict({"upload": ArrayRecord({"w": torch.zeros(2)}),
                                                 "result": MetricRecord({"steps": 4})}))
    runner.exchange = lambda messages: ({0: answer}, {1: "no answer from its SuperNode", 2: "error reply: boom"})
    import fedlora.flower.server_app as server_app
    from fedlora.methods.base import RoundPlan

    monkeypatch.setattr(server_app, "Message", lambda *a, **k: None)  # no Flower run context in a unit test
    out = runner.train(RoundPlan(1, frozenset({"w"}), ("w",)), {"w": torch.zeros(2)}, [0, 1, 2])
    assert out.answered == [0] and out.charged == {0: 4, 1: 4, 2: 4}  # the late and the failed client may have run
    assert {f["client"]: f["reason"] for f in out.failures} == {1: "no answer from its SuperNode", 2: "error reply: boom"}
    assert out.losses == []  # a DP client reports no loss


def test_a_node_never_uploads_what_its_method_does_not_declare(tiny_cfg):
    """Even a method whose upload seam returns a local-only tensor (FedSA's B) cannot make it leave."""
    sim = _fedsa(tiny_cfg)
    local_b = next(k for k in sim.local_keys if ".lora_B." in k)
    leaky = dataclasses.replace(sim.method, upload=lambda plan, before, after, trace: {**after, local_b: after[local_b]})
    sim.method = leaky
    plan = sim.method.plan(sim.plan_context(1))
    before = sim.nodes[0].state
    with pytest.raises(Refused, match="will not upload"):
        sim.nodes[0].train(plan, {k: sim.global_state[k] for k in plan.download})
    assert sim.nodes[0].state is before  # nothing committed


def test_loading_a_tensor_of_another_shape_is_refused_not_broadcast(tiny_cfg):
    sim = _one_step_sim(tiny_cfg, reproducible=True)
    key = next(k for k in sim.global_state if ".lora_A." in k)
    before = sim.rt.adapted.named[key].detach().clone()
    with pytest.raises(ValueError, match="shape"):
        sim.rt.adapted.load({key: torch.ones(1)})
    assert torch.equal(sim.rt.adapted.named[key], before)
