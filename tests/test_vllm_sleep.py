"""Sleep mode and the weight push (issue: sleeping discarded the update). The trainer's order is
wake -> rollout -> sleep -> learn -> push weights -> (next step) wake. vLLM's sleep level 1 keeps a
CPU copy of the weights that wake_up restores, so weights pushed into a sleeping engine were
overwritten by the stale copy on the next wake. The engine below has exactly those semantics."""

from __future__ import annotations

import torch

from rollout.backends.vllm import VLLMBackend


class Level1Engine:
    """vLLM's sleep level 1 as far as weights go: ``sleep`` copies the live weights to CPU; waking
    the weights restores that copy; ``reload_weights`` writes into the live weights."""

    def __init__(self):
        self.live = {"w": 0.0}
        self.cpu_copy = None
        self.weights_awake = True
        self.calls = []

    def sleep(self, level=1):
        self.calls.append(("sleep", level))
        self.cpu_copy, self.weights_awake = dict(self.live), False

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))
        if (tags is None or "weights" in tags) and not self.weights_awake:
            self.live, self.weights_awake = dict(self.cpu_copy), True

    def collective_rpc(self, method, kwargs):
        self.calls.append((method,))
        for name, t in kwargs["weights_iterator"]:
            self.live[name] = float(t)

    def apply_model(self, fn):
        pass

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def test_weights_pushed_after_sleep_survive_the_next_wake_up():
    engine = Level1Engine()
    be = VLLMBackend(engine, tokenizer=object(), sleep_enabled=True)
    for value in (1.0, 2.0):
        be.wake_up()  # rollout_stage
        assert engine.weights_awake and engine.live["w"] == value - 1.0  # generating with the last push
        be.sleep()
        be.load_weights([("w", torch.tensor(value))])  # sync_stage, after the learner step
        assert engine.live["w"] == value
    be.wake_up()
    assert engine.live["w"] == 2.0  # not the CPU copy taken at the last sleep (1.0)
    assert engine.calls[:5] == [
        ("sleep", 1),
        ("wake_up", ["weights"]),
        ("reload_weights",),
        ("reset_prefix_cache",),
        ("wake_up", None),
    ]


def test_an_engine_without_sleep_mode_is_never_put_to_sleep():
    engine = Level1Engine()
    be = VLLMBackend(engine, tokenizer=object(), sleep_enabled=False)
    be.wake_up()
    be.sleep()
    be.load_weights([("w", torch.tensor(3.0))])
    be.wake_up()
    assert engine.live["w"] == 3.0 and [c[0] for c in engine.calls] == ["reload_weights", "reset_prefix_cache"]
