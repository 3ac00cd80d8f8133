"""`fedlora methods`: every registered method with its four seams (as the compose config names
them) and its paper; the help shows the composed-method syntax."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.config import AdapterConfig
from fedlora.methods import MethodSetup, available_methods
from fedlora.methods.catalog import catalog, paper_of
from fedlora.methods.compose import KINDS, SEAMS, compose_method, profile

runner = CliRunner()


def test_methods_lists_every_method_with_its_seams_and_paper():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in available_methods():
        i = next(i for i, line in enumerate(lines) if line.startswith(f"{name} "))
        seams = dict(re.findall(r"(\w+)=([\w-]+)", lines[i + 1].split("seams:")[1]))
        assert list(seams) == list(KINDS) and all(seams[k] in SEAMS[k] for k in KINDS), lines[i + 1]
        assert re.search(r"paper: .*https://arxiv\.org/abs/\d{4}\.\d{4,5}", lines[i + 2]), lines[i + 2]
    out = result.output
    assert "plan=layerwise schedule=joint upload=scores aggregate=score-ema" in out  # as-lora
    assert "plan=all schedule=alternate-steps upload=trained aggregate=mean" in out  # la-lora
    for kind in KINDS:  # every seam name the compose config accepts is listed
        assert all(n in out.split("seam names:")[1] for n in SEAMS[kind])


def test_the_listed_seams_compose_back_into_the_same_method():
    setup = lambda: MethodSetup({}, True, 10, 0, adapter=AdapterConfig(rslora=True))  # noqa: E731
    for entry in catalog():
        if entry.name == "fedsa-vera":
            continue  # its seams are fedsa-lora's (VeRA is an adapter choice)
        built = compose_method("dp-lora", dict(entry.seams), setup())
        assert {k: s.name for k, s in profile(built).items() if s} == entry.seams, entry.name


def test_paper_is_the_docstring_citation_up_to_its_arxiv_link():
    assert paper_of("fedlora.methods.fedsvd").startswith('Lee et al., "FedSVD')
    assert paper_of("fedlora.methods.fedsvd").endswith("https://arxiv.org/abs/2505.12805")
    assert paper_of("fedlora.methods.as_lora").endswith("(https://arxiv.org/abs/2605.05769)")  # parenthesis closed


def test_methods_help_shows_the_composed_method_syntax():
    out = runner.invoke(app, ["methods", "--help"]).output
    assert "-s method.aggregate=fedex" in out and "la-lora+aggregate=fedex" in out
