"""exitrl bench commands refuse bad input with one line naming it (exit 2), before building anything."""

import pytest


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "repeats must be >= 1, got 0"),
        (["--backend", "hf", "--compiled"], "--compiled is for --backend vllm only"),
    ],
)
def test_bench_rollout_refuses_bad_options_before_building_anything(argv, message, capsys, monkeypatch):
    import rl.models.tiny_reasoner as tiny
    from rl.cli import main

    def no_build(*a, **k):
        raise AssertionError("a model was built for a refused option")

    monkeypatch.setattr(tiny, "build_tiny_model", no_build)
    assert main(["bench", "rollout", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_bench_routed_names_a_missing_routers_folder(backend, tmp_path, capsys):
    from rl.cli import main

    missing = tmp_path / "no_routers"
    assert main(["bench", "routed", "--routers", str(missing), "--backend", backend]) == 2
    err = capsys.readouterr().err
    assert err.startswith("exitrl bench routed: ")
    assert f"{missing}: no routers.safetensors" in err
