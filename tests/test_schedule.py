import pytest
import torch

from ds_upcycle.training.schedule import WSDSchedule


def make(total=100, warmup=10, decay=0.1, min_ratio=0.0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return opt, WSDSchedule(opt, total=total, warmup=warmup, decay_fraction=decay, min_ratio=min_ratio)


def lrs(opt, sched, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        sched.step()
    return out


def test_warmup_stable_decay_shape():
    opt, sched = make()
    values = lrs(opt, sched, 100)
    assert values[:3] == [0.1, 0.2, 0.3] and values[9] == 1.0
    assert all(v == 1.0 for v in values[9:90])
    decay = values[90:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert abs(decay[-1]) < 1e-12 and abs(decay[0] - 0.9) < 1e-12


def test_min_ratio():
    opt, sched = make(total=20, warmup=0, decay=0.5, min_ratio=0.1)
    assert abs(lrs(opt, sched, 20)[-1] - 0.1) < 1e-12


def test_new_stage_restarts_from_current_step_with_given_peaks():
    opt, sched = make(total=10, warmup=2)
    lrs(opt, sched, 10)
    sched.start_stage(total=10, warmup=5, decay_fraction=0.1, min_ratio=0.0, peak_lrs=[0.5])
    values = lrs(opt, sched, 10)
    assert sched.stage_start == 10 and abs(values[0] - 0.1) < 1e-12 and values[5] == 0.5


def test_new_stage_takes_every_setting_anew():
    # The source stage (restored from a checkpoint) had almost no decay and no floor; the new
    # stage asks for a long decay to a floor: every one of its LRs follows the new settings.
    opt, sched = make(total=10, warmup=2, decay=0.001, min_ratio=0.0)
    lrs(opt, sched, 10)
    sched.start_stage(total=10, warmup=1, decay_fraction=0.5, min_ratio=0.2, peak_lrs=[2.0])
    expected = [2.0] * 5 + [2.0 * (1 - 0.8 * k / 5) for k in range(1, 6)]
    assert lrs(opt, sched, 10) == pytest.approx(expected, abs=1e-12)
    assert sched.settings() == {"total": 10, "warmup": 1, "decay_fraction": 0.5, "min_ratio": 0.2,
                                "peak_lrs": [2.0]}


def test_state_round_trip():
    opt, sched = make()
    lrs(opt, sched, 37)
    opt2, sched2 = make(total=5)
    sched2.load_state_dict(sched.state_dict())
    assert lrs(opt2, sched2, 63) == lrs(opt, sched, 63)
