"""`auto`'s rule (batch/methods.py: break_even, choose, choice_line): pure functions of the measured figures."""

from __future__ import annotations

from pathlib import Path

from nst_batch.config.manifest import Settings
from nst_batch.batch import methods
from nst_batch.batch.methods import Measured, StyleMethod, break_even, choice_line, choose


def test_break_even_is_training_over_the_saving_a_photo_rounded_up():
    assert break_even(Measured(train_s=213.0, optimize_s=20.2, network_s=7.1, loss_ratio=1.08)) == 17  # 16.3
    assert break_even(Measured(300.0, 20.0, 5.0, 1.0)) == 20  # exactly 20: no rounding up
    assert break_even(Measured(300.0, 20.0, 5.0, 1.10)) == 20  # at the limit still switches


def test_no_break_even_when_the_network_path_is_worse_than_the_limit_or_no_faster():
    assert break_even(Measured(213.0, 20.2, 7.1, 1.14)) is None  # faster, but 14% worse
    assert break_even(Measured(213.0, 20.2, 7.1, 1.14), loss_limit=1.2) == 17
    assert break_even(Measured(10.0, 20.0, 20.0, 1.0)) is None  # as good, no saving a photo
    assert break_even(Measured(10.0, 20.0, 25.0, 1.0)) is None


def test_choose_switches_at_the_break_even_and_never_without_one(monkeypatch):
    monkeypatch.setitem(methods.BREAK_EVEN, "cpu", 30)
    assert [choose("auto", n, "cpu") for n in (29, 30)] == ["optimize", "network"]
    assert choose("auto", 30, "mps") == "network"  # other device types count as the CPU
    assert choose("optimize", 10_000, "cpu") == "optimize" and choose("network", 1, "cpu") == "network"
    monkeypatch.setitem(methods.BREAK_EVEN, "cpu", None)
    assert choose("auto", 1_000_000, "cpu") == "optimize"
    assert choose("network", 1, "cpu") == "network"  # asked for explicitly, still made


def test_choice_line_names_the_break_even_or_why_there_is_none(monkeypatch):
    s = Settings(content=Path("c"), styles=Path("s"))
    sm = StyleMethod("a.jpg", "optimize", "r", (), "models/a.jpg.pt", 40)
    monkeypatch.setitem(methods.BREAK_EVEN, "cpu", 25)
    assert choice_line(sm, s, "cpu") == "a.jpg: method optimize (40 photo(s) pending; auto trains a network from 25 on cpu)"
    monkeypatch.setitem(methods.BREAK_EVEN, "cpu", None)
    assert choice_line(sm, s, "cpu") == ("a.jpg: method optimize (40 photo(s) pending; auto trains none on cpu: "
                                         "none was measured within 1.10x of optimize's loss)")
    assert choice_line(sm, s.replace(method="optimize"), "cpu") == "a.jpg: method optimize (key 'method')"


def test_the_shipped_figures_decide_as_measured():
    """The break-even comes from the measured figures: the network path with the default refinement within
    1.10x of optimize's loss on varied photos, so `auto` trains a network from the break-even on."""
    assert methods.BREAK_EVEN["cpu"] == break_even(methods.MEASURED) == methods.BREAK_EVEN["cuda"]
    assert (methods.MEASURED.loss_ratio > methods.LOSS_LIMIT) == (methods.BREAK_EVEN["cpu"] is None)
    n = methods.BREAK_EVEN["cpu"]
    assert n == 11  # 218 s / (39.3 s - 18.8 s) = 10.6 (docs/networks.md says so)
    assert [choose("auto", k, "cpu") for k in (n - 1, n)] == ["optimize", "network"]
