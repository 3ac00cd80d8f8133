"""`fedlora flower up | sim`: the same experiment on Flower (deployment on 127.0.0.1, or simulation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

flower_app = typer.Typer(no_args_is_help=True, help="Run an experiment on Flower (needs `pip install fedlora[flower]`).")

MinOpt = Annotated[int | None, typer.Option("--min-clients", help="fewest answering clients a round may finish with "
                                                                   "(default: federation.min_clients)")]


def _config(config: Path | None, set_: list[str] | None):
    from fedlora.config import load_config  # noqa: PLC0415
    from fedlora.console import overrides, quiet_libraries  # noqa: PLC0415
    from fedlora.errors import ConfigError  # noqa: PLC0415

    try:
        import flwr  # noqa: F401, PLC0415
    except ImportError:
        raise ConfigError("Flower is not installed; run `pip install 'fedlora[flower]'`") from None
    quiet_libraries()
    return load_config(config, overrides(set_ or [], {}))


def _summary(run_dir: Path) -> None:
    import json  # noqa: PLC0415

    summary = json.loads((run_dir / "summary.json").read_text())
    typer.echo(f"{summary['line']}\nrun directory: {run_dir}")


@flower_app.command()
def up(
    config: Annotated[Path | None, typer.Argument(help="YAML config")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. -s federation.rounds=5")] = None,
    min_clients: MinOpt = None,
    round_timeout: Annotated[float, typer.Option(help="seconds a round waits for its clients")] = 600.0,
    node_workers: Annotated[bool, typer.Option(help="a long-running worker per SuperNode keeps the model built "
                                                    "between messages (off: every message rebuilds it)")] = True,
) -> None:
    """Start a SuperLink and one SuperNode per client on 127.0.0.1 (TLS, SuperNode authentication),
    run the experiment, stop every process; writes the usual run directory."""
    from fedlora.console import user_errors  # noqa: PLC0415

    @user_errors
    def go() -> None:
        from fedlora.flower.deploy import up as deploy_up  # noqa: PLC0415

        _summary(deploy_up(_config(config, set_), min_clients=min_clients, round_timeout=round_timeout,
                           node_workers=node_workers))

    go()


@flower_app.command()
def sim(
    config: Annotated[Path | None, typer.Argument(help="YAML config")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. -s federation.rounds=5")] = None,
    min_clients: MinOpt = None,
) -> None:
    """Run the experiment on Flower's simulation runtime (Ray), one virtual SuperNode per client."""
    from fedlora.console import user_errors  # noqa: PLC0415

    @user_errors
    def go() -> None:
        from fedlora.flower.simulate import simulate  # noqa: PLC0415
        from fedlora.report.rundir import RunDir  # noqa: PLC0415

        cfg = _config(config, set_)
        RunDir.check_free(cfg.output.root, cfg.output.name)
        stem = cfg.output.name or f"{cfg.method.name}-flower-sim"
        path = Path(cfg.output.root) / stem
        i = 1
        while path.exists():
            i += 1
            path = Path(cfg.output.root) / f"{stem}-{i}"
        _summary(simulate(cfg, path, min_clients=min_clients))

    go()
