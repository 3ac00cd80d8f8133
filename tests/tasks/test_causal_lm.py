"""The causal-lm task on tiny random decoders (GPT-2 with Conv1D, Llama with q/k/v/o_proj) and
prompt/response pairs the tests write: data and the response-only loss, exact match against
greedy decoding, per-sample gradients against a one-example loop, a DP run whose held-out loss
goes down, the adapter reloaded by PEFT, every method for one round, and ``fedlora compare``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedlora.config import build_config
from fedlora.errors import ConfigError, DataError
from fedlora.federation.runtime import Runtime
from fedlora.federation.simulation import Simulation
from fedlora.methods import available_methods
from fedlora.privacy.dpsgd import PerSampleGradients, loop_per_sample
from tests.helpers import NEEDS, lm_tree, make_pairs, write_tiny_decoder

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def decoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    return {kind: write_tiny_decoder(root / kind, kind) for kind in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    make_pairs(240).to_json(path, orient="records", lines=True)
    return path


@pytest.fixture
def lm_cfg(decoders: dict[str, Path], pairs: Path, tmp_path: Path):
    def make(kind: str = "gpt2", **sections: dict):
        return build_config(lm_tree(decoders[kind], pairs, tmp_path / "runs", **sections))

    return make


# ---------------------------------------------------------------- config and data
def test_config_defaults_no_head_and_per_architecture_targets(lm_cfg) -> None:
    cfg = lm_cfg()
    assert cfg.adapter.target_modules == ["auto"] and not cfg.adapter.train_head and not cfg.adapter.federate_head
    assert lm_cfg(adapter={"target_modules": ["c_attn", "c_fc"]}).adapter.target_modules == ["c_attn", "c_fc"]
    with pytest.raises(ConfigError, match="no classification head"):
        lm_cfg(adapter={"train_head": True})
    rt = Runtime(lm_cfg("llama", adapter={"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}))
    assert {f.module.split(".")[-1] for f in rt.adapted.factors} == {"q_proj", "v_proj", "up_proj", "down_proj"}
    assert {f.role for f in rt.adapted.factors} == {"A", "B"}


def test_auto_targets_and_conv1d_base_weights_as_out_in(lm_cfg) -> None:
    from fedlora.adapters import inject_adapters
    from fedlora.config import AdapterConfig

    with pytest.raises(ConfigError, match="knows no default"):
        inject_adapters(nn.Sequential(nn.Linear(4, 4)), AdapterConfig(target_modules=["auto"], train_head=False), 0)
    adapted = Runtime(lm_cfg()).adapted
    (w0,) = [n for n in adapted.base_weight_names() if ".h.0." in n]
    stored = adapted.named[w0]
    assert tuple(stored.shape) == (16, 48) and w0 in adapted.transposed  # GPT-2's Conv1D: (in, out)
    view = adapted.state([w0])[w0]
    assert tuple(view.shape) == (48, 16) and torch.equal(view, stored.t())  # as B @ A: (out, in)
    adapted.load({w0: view + 1.0})
    assert torch.equal(adapted.named[w0].detach(), (view + 1.0).t())  # written back as (in, out)


def test_local_files_columns_and_groups(lm_cfg, tmp_path: Path) -> None:
    df = make_pairs(60).rename(columns={"prompt": "instruction", "response": "output"})
    for path in (tmp_path / "p.csv", tmp_path / "p.parquet"):
        df.to_csv(path, index=False) if path.suffix == ".csv" else df.to_parquet(path)
        cfg = lm_cfg(task={"dataset": str(path), "prompt_column": "instruction", "response_column": "output",
                           "label_column": "kind"})
        task = Runtime(cfg).task
        assert len(task.train) + len(task.test) == 60 and task.label_names == ["copy", "reverse"]
        assert set(task.train.labels) == {0, 1}  # the Dirichlet split follows the grouping column
    with pytest.raises(DataError, match="task.prompt_column"):
        Runtime(lm_cfg(task={"dataset": str(tmp_path / "p.csv")}))
    folder = tmp_path / "folder"
    folder.mkdir()
    make_pairs(50, seed=1).to_json(folder / "train.jsonl", orient="records", lines=True)
    make_pairs(10, seed=2).to_json(folder / "test.json", orient="records")
    task = Runtime(lm_cfg(task={"dataset": str(folder)})).task
    assert (len(task.train), len(task.test), task.label_names) == (50, 10, ["all"])


def test_truncation_keeps_the_response_and_a_prompt_token(lm_cfg) -> None:
    task = Runtime(lm_cfg("llama", task={"max_length": 6})).task
    ids, n = task.encode_pair("copy : red blue green cat", "red blue green cat")
    assert len(ids) == 6 and n == 1 and ids[-1] == task.eos_id  # 5 response tokens (4 words + EOS) and 1 of the prompt


# ---------------------------------------------------------------- loss and metric
class _Logits(nn.Module):
    """Returns fixed logits as the model output: the loss's gradient with respect to each position."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.value = nn.Parameter(logits)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.value})()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_loss_is_the_mean_over_response_tokens_only(lm_cfg, kind: str) -> None:
    task = Runtime(lm_cfg(kind)).task
    idx = np.asarray([0, 1, 2])
    batch = task.batch(task.train, idx, CPU)
    b, t = batch["input_ids"].shape
    fake = _Logits(torch.randn(b, t, len(task.tokenizer), dtype=torch.float64))
    losses = task.loss(fake, batch)
    losses.sum().backward()
    grad = fake.value.grad.abs().sum(-1)  # (batch, tokens)
    for r, i in enumerate(idx):
        ids = task.train.features["input_ids"][i]
        n = int(task.train.features["prompt_length"][i][0])
        logp = torch.log_softmax(fake.value.detach()[r], -1)
        want = -torch.stack([logp[p, ids[p + 1]] for p in range(n - 1, len(ids) - 1)]).mean()
        assert torch.allclose(losses[r], want)
        assert torch.all(grad[r, : n - 1] == 0) and torch.all(grad[r, len(ids) - 1 :] == 0)  # prompt, last token, padding
        assert torch.all(grad[r, n - 1 : len(ids) - 1] > 0)  # every position that predicts a response token


def test_exact_match_equals_greedy_decoding(lm_cfg) -> None:
    """A reference equal to the greedy continuation scores 1, one token off scores 0: exact match
    read off the teacher-forced pass is the exact match of greedy generation."""
    from fedlora.tasks import ExampleSet

    rt = Runtime(lm_cfg("llama"))
    task, model = rt.task, rt.adapted.model.eval()
    rows, plens, off = [], [], []
    for i in range(4):
        ids = list(task.train.features["input_ids"][i][: int(task.train.features["prompt_length"][i][0])])
        n = len(ids)
        with torch.no_grad():
            for _ in range(4):  # greedy: the argmax of the last position, appended
                ids.append(int(model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids))).logits[0, -1].argmax()))
        rows.append(np.asarray(ids))
        plens.append(np.asarray([n]))
        bad = list(ids)
        bad[-2] = (bad[-2] + 1) % len(task.tokenizer)
        off.append(np.asarray(bad))
    labels = np.zeros(4, np.int64)
    good = task.evaluate(model, ExampleSet({"input_ids": rows, "prompt_length": plens}, labels), 3, CPU)
    wrong = task.evaluate(model, ExampleSet({"input_ids": off, "prompt_length": plens}, labels), 3, CPU)
    assert good["exact_match"] == good["accuracy"] == 1.0 and good["token_accuracy"] == 1.0
    assert wrong["exact_match"] == 0.0 and wrong["token_accuracy"] < 1.0 and wrong["loss"] > good["loss"]
    assert np.isclose(good["perplexity"], np.exp(good["loss"]))
    text = task.generate(model, task.train.extra["prompts"][0], max_new_tokens=4)
    assert text == task.tokenizer.decode(rows[0][plens[0][0]:], skip_special_tokens=True)


# ---------------------------------------------------------------- per-sample gradients (fp64 oracle)
@pytest.mark.parametrize("kind,vera", [("gpt2", False), ("llama", False), ("gpt2", True)])
def test_fused_per_sample_gradients_equal_a_one_example_loop(lm_cfg, kind: str, vera: bool) -> None:
    cfg = lm_cfg(kind, adapter={"type": "vera", "rank": 4} if vera else {})
    rt = Runtime(cfg)
    model = rt.adapted.model.double()
    with torch.no_grad():  # B starts at zero: move it so that A's gradient is not zero
        for p in rt.adapted.params.values():
            p.add_(0.1 * torch.randn_like(p))
    params = rt.adapted.params
    assert rt.hooks.fused == set(params)  # LoRA's lora_A/lora_B are nn.Linear even on a Conv1D base
    idx = np.asarray([0, 5, 9, 13])  # different lengths: padding inside the batch
    batch = rt.task.batch(rt.task.train, idx, CPU)
    rt.hooks.enabled = True
    losses = rt.task.loss(model, batch)
    torch.autograd.grad(losses.sum(), list(params.values()))
    fused = rt.hooks.fused_grads(list(params))
    rt.hooks.enabled = False
    loop = loop_per_sample(params, lambda i: rt.task.loss(model, {k: v[i] for k, v in batch.items()}), len(idx))
    for k in params:
        assert fused[k].dtype == torch.float64
        torch.testing.assert_close(fused[k], loop[k], rtol=1e-9, atol=1e-12)


def test_conv1d_weights_fuse_like_a_transposed_linear(lm_cfg) -> None:
    """GPT-2's Conv1D (weight (in, out)) trained directly: fused per-sample gradients equal the loop."""
    rt = Runtime(lm_cfg())
    model = rt.adapted.model.double()
    from transformers.pytorch_utils import Conv1D

    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert convs
    name, conv = next((n, m) for n, m in convs.items() if n.endswith("mlp.c_fc"))
    params = {f"{name}.weight": conv.weight, f"{name}.bias": conv.bias}
    for p in params.values():
        p.requires_grad_(True)
    hooks = PerSampleGradients(params, model)
    assert hooks.fused == set(params) and not hooks.other
    batch = rt.task.batch(rt.task.train, np.asarray([1, 2, 3]), CPU)
    hooks.enabled = True
    torch.autograd.grad(rt.task.loss(model, batch).sum(), list(params.values()))
    fused = hooks.fused_grads(list(params))
    hooks.remove()
    loop = loop_per_sample(params, lambda i: rt.task.loss(model, {k: v[i] for k, v in batch.items()}), 3)
    assert fused[f"{name}.weight"].shape == (3, *conv.weight.shape)
    for k in params:
        torch.testing.assert_close(fused[k], loop[k], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- training, saving, every method
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_short_dp_run_lowers_held_out_loss_and_the_adapter_reloads_in_peft(lm_cfg, kind: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.experiment import run_experiment

    cfg = lm_cfg(kind, federation={"num_clients": 2, "rounds": 3, "local_steps": 8, "partition": "iid"},
                 privacy={"epsilon": 8.0}, train={"batch_size": 32, "optimizer": "adam", "lr": 0.02, "threads": 1},
                 adapter={"rank": 4, "alpha": 8})
    rt = Runtime(cfg)
    before = rt.evaluate(rt.adapted.state())
    summary = run_experiment(cfg, progress=False, runtime=rt)
    after = summary["final"]
    assert after["loss"] < before["loss"] - 0.05, (before, after)
    assert summary["accuracy_is"] == "exact match" and "exact match" in summary["line"] and "perplexity" in summary["line"]
    assert 0 < after["epsilon"] <= 8.0
    run = Path(summary["run_dir"])
    base = AutoModelForCausalLM.from_pretrained(cfg.task.model).double().eval()
    reloaded = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    ours = rt.adapted.model.double().eval()
    batch = rt.task.batch(rt.task.test, np.arange(4), CPU)
    with torch.no_grad():
        want = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    fresh = AutoModelForCausalLM.from_pretrained(cfg.task.model).double().eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, want)


def test_head_only_is_refused_in_one_line_on_a_task_without_a_head(lm_cfg) -> None:
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match="trains only the head"):
        Simulation(lm_cfg("gpt2", method={"name": "head-only"}, federation={"num_clients": 2, "rounds": 1}))


@pytest.mark.parametrize("method", sorted(set(available_methods()) - {"head-only"}))
def test_every_method_runs_one_round(lm_cfg, method: str) -> None:
    from fedlora.experiment import run_experiment

    needs = {k: dict(v) for k, v in NEEDS.get(method, {}).items()}
    cfg = lm_cfg("gpt2", method={"name": method}, federation={"num_clients": 2, "rounds": 1, "local_steps": 2},
                 train={"threads": 1}, **needs)
    sim = Simulation(cfg)
    summary = run_experiment(cfg, progress=False, runtime=sim.rt)
    rec = json.loads((Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(rec["loss"]) and 0 <= rec["accuracy"] <= 1 and rec["epsilon"] > 0
    b_names = {f.name for f in sim.rt.adapted.factors if f.role == "B"}
    if method.startswith("fedsa"):  # B (VeRA's lambda_b) stays on the clients
        assert sim.local_keys == b_names and not (b_names & set(sim.global_state))
        assert "personal_accuracy" in rec
    if method in ("fedex-lora", "flora"):  # exact aggregation through GPT-2's (in, out) base weights
        assert rec["aggregation_error"] is not None and rec["aggregation_error"] < 1e-6, rec["aggregation_error"]


def test_compare_runs_on_causal_lm(decoders: dict[str, Path], pairs: Path, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from fedlora.cli import app

    tree = lm_tree(decoders["gpt2"], pairs, tmp_path / "runs", federation={"num_clients": 2, "rounds": 1, "local_steps": 2},
                   train={"threads": 1})
    cfg_file = tmp_path / "lm.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(app, ["compare", str(cfg_file), "--methods", "dp-lora,fedsa-lora", "--epsilons", "4",
                                      "--seeds", "1", "--out", str(tmp_path / "cmp"), "--name", "lm"])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "cmp" / "lm" / "results.md").read_text()
    assert "accuracy (exact match)" in md and "| dp-lora" in md and "| fedsa-lora" in md and "Majority" not in md, md


def test_batched_clients_give_the_sequential_result(lm_cfg) -> None:
    """K clients per pass over the shared decoder (federation/batched.py) equal one after another."""
    states = []
    for k in (0, 2):
        sim = Simulation(lm_cfg(federation={"num_clients": 2, "rounds": 1, "local_steps": 2, "batched_clients": k},
                                train={"threads": 1}))
        assert sim.batched_k == k
        states.append(sim.run().global_state)
    for name in states[0]:
        torch.testing.assert_close(states[1][name], states[0][name], rtol=1e-5, atol=1e-6)


def test_a_bf16_checkpoint_loads_in_fp32(decoders: dict[str, Path], pairs: Path, tmp_path: Path) -> None:
    """transformers loads a checkpoint in its own dtype; the task asks for fp32 (factors, per-sample
    gradients and noise stay fp32; train.precision=bf16 autocasts the forward instead)."""
    import shutil

    from transformers import AutoModelForCausalLM

    bf16 = tmp_path / "bf16"
    shutil.copytree(decoders["llama"], bf16)
    AutoModelForCausalLM.from_pretrained(decoders["llama"]).to(torch.bfloat16).save_pretrained(bf16)
    assert AutoModelForCausalLM.from_pretrained(bf16).dtype == torch.bfloat16
    rt = Runtime(build_config(lm_tree(bf16, pairs, tmp_path / "runs")))
    assert {p.dtype for p in rt.adapted.model.parameters()} == {torch.float32}


def test_fedlora_run_on_causal_lm(decoders: dict[str, Path], pairs: Path, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from fedlora.cli import app

    tree = lm_tree(decoders["llama"], pairs, tmp_path / "runs", federation={"num_clients": 2, "local_steps": 2},
                   train={"threads": 1})
    cfg_file = tmp_path / "lm.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(app, ["run", str(cfg_file), "--rounds", "1", "-s", "method.name=ffa-lora"])
    assert result.exit_code == 0, result.output
    assert "ffa-lora: exact match" in result.output and "held-out perplexity" in result.output


def test_batches_reach_the_device_through_the_non_blocking_copy(lm_cfg, monkeypatch) -> None:
    from fedlora.tasks import causal_lm

    copied = []
    real = causal_lm.to_device
    monkeypatch.setattr(causal_lm, "to_device", lambda t, d: copied.append(t.shape) or real(t, d))
    task = Runtime(lm_cfg("llama")).task
    batch = task.batch(task.train, np.arange(3), torch.device("cpu"))
    assert len(copied) == 3 and set(batch) == {"input_ids", "attention_mask", "labels"}
