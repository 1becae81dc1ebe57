"""The autotuner's bookkeeping on CPU: which variants compete, and who wins."""

from benchmarks.autotune import candidates, pick_winners
from generator.profiles import specs_for
from generator.spec import Arch


def test_candidates_are_knob_alternatives_of_one_key():
    names = [s.name for s in specs_for(Arch.SM90, "full")]
    groups = candidates(names, Arch.SM90)
    assert groups, "the full profile has alternative tiles"
    group = groups["post_dyn_n4_h4096_bf16_sm90"]
    assert group == sorted(group) and len(group) == 4
    assert not candidates([s.name for s in specs_for(Arch.SM90)], Arch.SM90)


def test_pick_winners_takes_the_fastest_then_the_smaller_name():
    timings = {"k": {"b_tm2": 1.0, "a_tm1": 1.0, "c_tm4": 2.0}, "j": {"x": 3.0, "y": 0.5}}
    assert pick_winners(timings) == {"k": "a_tm1", "j": "y"}


def test_tune_profile_adds_tiles_at_the_benchmark_size_only():
    default = {s.name for s in specs_for(Arch.SM90)}
    tune = {s.name for s in specs_for(Arch.SM90, "tune")}
    assert default < tune
    groups = candidates(sorted(tune), Arch.SM90)
    assert "pre_dyn_n4_h4096_bf16_sm90" in groups
    # The projection has no hidden axis: its tiles are tuned at n = 4 for any hidden.
    assert all("_n4_h4096_" in key or key == "proj_dyn_n4_hany_bf16_sm90" for key in groups)
