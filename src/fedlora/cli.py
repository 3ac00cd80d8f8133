"""Command line: ``fedlora run | account | audit | compare | plot | methods | tasks``.

Errors a user can cause are printed in one line (problem and fix) with exit code 2.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from fedlora.console import overrides as _overrides
from fedlora.console import quiet_libraries, user_errors

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Differentially private federated fine-tuning with LoRA adapters.")


ConfigArg = Annotated[Path | None, typer.Argument(help="YAML config (defaults for every key left out)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. -s federation.rounds=5")]


@app.command()
@user_errors
def run(
    config: ConfigArg = None,
    set_: SetOpt = None,
    method: Annotated[str | None, typer.Option(help="method name (see `fedlora methods`)")] = None,
    epsilon: Annotated[float | None, typer.Option(help="target epsilon per client")] = None,
    rounds: Annotated[int | None, typer.Option(help="communication rounds")] = None,
    clients: Annotated[int | None, typer.Option(help="number of clients")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of everything")] = None,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="non-private reference run")] = False,
    name: Annotated[str | None, typer.Option(help="run directory name under output.root")] = None,
    out: Annotated[str | None, typer.Option(help="folder that holds run directories")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    resume: Annotated[Path | None, typer.Option(help="continue this run directory from its latest checkpoint")] = None,
) -> None:
    """Run one federated fine-tuning experiment and write a run directory (or --resume one)."""
    from fedlora.config import load_config  # noqa: PLC0415

    flags = {"method.name": method, "privacy.epsilon": epsilon, "federation.rounds": rounds,
             "federation.num_clients": clients, "train.seed": seed, "output.name": name, "output.root": out}
    if no_dp:
        flags["privacy.enabled"] = False
    if resume is None:
        from fedlora.methods.registry import METHOD_DEFAULTS  # noqa: PLC0415

        cfg = load_config(config, {**METHOD_DEFAULTS.get(method or "", {}), **_overrides(set_ or [], flags)})
    else:
        from fedlora.resume import resume_config  # noqa: PLC0415

        cfg = resume_config(resume, config, _overrides(set_ or [], flags))
    quiet_libraries()
    from fedlora.experiment import run_experiment  # noqa: PLC0415

    summary = run_experiment(cfg, progress=not quiet, resume=resume)
    typer.echo(summary["line"])


@app.command()
@user_errors
def account(
    epsilon: Annotated[float | None, typer.Option(help="target epsilon: print the sigma that meets it")] = None,
    sigma: Annotated[float | None, typer.Option(help="noise multiplier: print the epsilon it spends")] = None,
    delta: Annotated[float, typer.Option(help="target delta")] = 1e-5,
    sample_rate: Annotated[float | None, typer.Option(help="Poisson sampling rate q")] = None,
    batch_size: Annotated[int | None, typer.Option(help="expected batch (q = batch / dataset size)")] = None,
    dataset_size: Annotated[int | None, typer.Option(help="examples on the client")] = None,
    steps: Annotated[int | None, typer.Option(help="noisy steps")] = None,
    rounds: Annotated[int | None, typer.Option(help="rounds (steps = rounds x local steps)")] = None,
    local_steps: Annotated[int | None, typer.Option(help="local steps per round")] = None,
    accountant: Annotated[str, typer.Option(help="prv or rdp")] = "prv",
) -> None:
    """Sigma for a privacy target and schedule, or (with --sigma) the epsilon spent."""
    from fedlora.privacy import account as acc  # noqa: PLC0415

    schedule = acc.resolve_schedule(sample_rate=sample_rate, batch_size=batch_size, dataset_size=dataset_size,
                                    steps=steps, rounds=rounds, local_steps=local_steps)
    acc.exactly_one("--epsilon", epsilon, "--sigma", sigma)
    if sigma is not None:
        typer.echo(acc.epsilon_for(sigma=sigma, delta=delta, schedule=schedule, accountant=accountant))
    else:
        assert epsilon is not None
        typer.echo(acc.noise_for(target_epsilon=epsilon, delta=delta, schedule=schedule, accountant=accountant))


@app.command()
@user_errors
def audit(
    config: ConfigArg = None,
    set_: SetOpt = None,
    canaries: Annotated[int | None, typer.Option(help="canaries M (black-box default 200: each goes into one client "
                                                       "with probability 1/2; white-box default: 85% of the active coordinates)")] = None,
    confidence: Annotated[float, typer.Option(help="confidence of the lower bound, in (0, 1)")] = 0.95,
    client: Annotated[int | None, typer.Option(help="the client that receives the canaries (black-box default 0; "
                                                    "white-box default: the largest sampling rate)")] = None,
    name: Annotated[str | None, typer.Option(help="run directory name under output.root")] = None,
    white_box: Annotated[bool, typer.Option("--white-box", help="Dirac gradient canaries at the DP step, scored on "
                                                                 "the released gradients (audit/whitebox.py)")] = False,
    mutations: Annotated[bool, typer.Option("--mutations", help="the white-box audit against deliberately broken "
                                                                "mechanisms and the honest one: a table (mutations.json)")] = False,
    epsilons: Annotated[str | None, typer.Option(help="--mutations: comma-separated target epsilons (default: the config's)")] = None,
) -> None:
    """Empirical privacy audit: a lower bound on epsilon against the claim (black-box canaries by default)."""
    from fedlora.config import load_config  # noqa: PLC0415
    from fedlora.errors import ConfigError  # noqa: PLC0415

    if not 0 < confidence < 1:
        raise ConfigError(f"--confidence must be in (0, 1) (got {confidence}); 0.95 is usual")
    eps_list = None
    if epsilons is not None:
        try:
            eps_list = [float(e) for e in epsilons.split(",") if e.strip()]
        except ValueError:
            raise ConfigError(f"--epsilons must be comma-separated numbers (got '{epsilons}'), e.g. 1,3,8") from None
        if not eps_list or any(e <= 0 for e in eps_list):
            raise ConfigError(f"--epsilons must be numbers > 0 (got '{epsilons}'), e.g. 1,3,8")
        if not mutations:
            raise ConfigError("--epsilons goes with --mutations")
    cfg = load_config(config, _overrides(set_ or [], {"output.name": name}))
    quiet_libraries()
    if mutations:
        from fedlora.audit.mutations import run_mutations  # noqa: PLC0415

        result = run_mutations(cfg, epsilons=eps_list, client=client, confidence=confidence, canaries=canaries)
        verdict = "every broken mechanism flagged, the honest one not" if result["all_flagged_correctly"] else \
            "SOME ROWS ARE WRONG (see the table)"
        typer.echo(result["table"])
        typer.echo(f"mutation audit: {verdict}; {result['seconds']:.0f} s; run directory: {result['run_dir']}")
        return
    if white_box:
        from fedlora.audit.whitebox import run_whitebox  # noqa: PLC0415

        result = run_whitebox(cfg, client=client, confidence=confidence, canaries=canaries)
    else:
        from fedlora.audit.canaries import run_audit  # noqa: PLC0415

        result = run_audit(cfg, canaries=200 if canaries is None else canaries, confidence=confidence,
                           client=0 if client is None else client)
    typer.echo(f"{result['line']}; run directory: {result['run_dir']}")


@app.command()
@user_errors
def compare(
    config: ConfigArg = None,
    set_: SetOpt = None,
    methods: Annotated[str | None, typer.Option(help="comma-separated methods (default: all registered)")] = None,
    epsilons: Annotated[str, typer.Option(help="comma-separated target epsilons, each > 0")] = "1,3,6",
    seeds: Annotated[int, typer.Option(help="seeds per cell: first-seed .. first-seed + n - 1")] = 3,
    first_seed: Annotated[int, typer.Option(help="the first seed (e.g. fresh seeds to confirm a choice made on others)")] = 0,
    out: Annotated[str | None, typer.Option(help="folder that holds the compare directory")] = None,
    name: Annotated[str | None, typer.Option(help="compare directory name; rerun with the same name to resume")] = None,
    no_dp_reference: Annotated[bool, typer.Option("--no-dp-reference", help="skip the non-private run per method")] = False,
    workers: Annotated[int, typer.Option(help="cells run at once, each in its own process (e.g. one per CPU core)")] = 1,
    baseline: Annotated[str | None, typer.Option(help="method the paired differences are taken against "
                                                 "(default: dp-lora when the grid runs it)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Run a grid of methods x epsilons x seeds; write results.md/.csv and figures (with each method's paired
    difference against the baseline and its 95% interval over seeds); print the table."""
    from fedlora.report.compare import plan_grid, run_compare  # noqa: PLC0415

    grid = plan_grid(config, methods=methods, epsilons=epsilons, seeds=seeds, overrides=_overrides(set_ or [], {}),
                     out=out, name=name, no_dp_reference=no_dp_reference, first_seed=first_seed)
    quiet_libraries()
    result = run_compare(grid, progress=not quiet, workers=workers, baseline=baseline)
    typer.echo(result["markdown"])
    typer.echo(f"compare directory: {grid.root}")


@app.command()
@user_errors
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories (each with metrics.jsonl)")],
    out: Annotated[Path | None, typer.Option(help="folder for the PNG files (default: the first run directory)")] = None,
) -> None:
    """PNG figures over rounds (accuracy, epsilon, aggregation error, sharpness, factor choices)."""
    from fedlora.report.plots import plot_runs  # noqa: PLC0415

    for path in plot_runs(list(run_dirs), out or run_dirs[0]):
        typer.echo(str(path))


@app.command()
@user_errors
def cache(
    clear: Annotated[bool, typer.Option("--clear", help="remove every entry")] = False,
    directory: Annotated[Path | None, typer.Option("--dir", help="the cache folder (default: where runs keep it, "
                                                   "$FEDLORA_CACHE_DIR/prefix or the user cache folder)")] = None,
) -> None:
    """The persistent prefix cache (frozen layers' outputs kept between runs): where it is, its size; --clear empties it."""
    from fedlora.tasks.prefix_store import PrefixStore, default_dir  # noqa: PLC0415

    store = PrefixStore(directory.expanduser() if directory else default_dir(), 0)

    def entries(n: int) -> str:
        return f"{n} {'entry' if n == 1 else 'entries'}"

    if clear:
        typer.echo(f"prefix cache {store.root}: removed {entries(store.clear())}")
        return
    count, size = store.usage()
    typer.echo(f"prefix cache {store.root}: {entries(count)}, {size / 1e6:.1f} MB"
               + ("" if store.root.is_dir() else " (no folder yet)"))


@app.command()
def methods() -> None:
    """List the registered methods: their four seams (plan, schedule, upload, aggregate) and paper.

    Composed methods: a registered method with seams replaced by name, e.g. `fedlora run -s method.name=la-lora -s method.aggregate=fedex` (config: `method: {name: la-lora, aggregate: fedex}`), named `la-lora+aggregate=fedex` in the outputs; an invalid combination is refused in one line. The seam names are listed at the end of the output.
    """
    from fedlora.methods.catalog import catalog, seam_names  # noqa: PLC0415

    for e in catalog():
        typer.echo(f"{e.name:14s} {e.description}")
        typer.echo(f"{'':14s} seams: {' '.join(f'{k}={v}' for k, v in e.seams.items())}")
        typer.echo(f"{'':14s} paper: {e.paper}")
    typer.echo("\ncompose: -s method.name=NAME -s method.<seam>=SEAM_NAME; seam names:")
    for kind, names in seam_names().items():
        typer.echo(f"  {kind:10s} {', '.join(names)}")


@app.command()
def tasks() -> None:
    """List the tasks and whether they run offline here."""
    from fedlora.tasks import available_tasks  # noqa: PLC0415
    from fedlora.tasks.base import offline_status  # noqa: PLC0415

    status = offline_status()
    for name, desc in available_tasks().items():
        typer.echo(f"{name:22s} {status[name]:14s} {desc}")


from fedlora.flower.cli import flower_app  # noqa: E402  (imports Flower only when a flower command runs)

app.add_typer(flower_app, name="flower")


def main() -> None:  # pragma: no cover
    start = time.time()
    try:
        app()
    finally:
        if os.environ.get("FEDLORA_TIMING"):
            print(f"[{time.time() - start:.1f}s]", file=sys.stderr)
