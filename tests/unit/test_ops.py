"""DeepSpeed's JIT-built ops: which ones our runs load, the one line before a build, silence when built.
And the conftest hook that prints each failure's cause as it happens (with pytest's own pytester)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, assert_user_error
from runs import free_port

from dsllm import ops

pytest_plugins = ["pytester"]

SHM = "deepspeed_shm_comm"
CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def _env(**extra) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def built_root(tmp_path_factory) -> Path:
    """A private extensions folder with the shm op built (every DeepSpeed run on CPU needs it): a copy of the
    session's, which `make install` prebuilt, brought up to date by `python -m dsllm.ops build` in a new process
    (a real build, ~30 s, only when the session's is missing or was rebuilt by another virtualenv)."""
    root = tmp_path_factory.mktemp("torch_extensions")
    session = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(sys.prefix, "torch_extensions")) / SHM
    if session.is_dir():
        shutil.copytree(session, root / SHM, ignore=shutil.ignore_patterns("lock"))  # with its file times
    proc = subprocess.run(
        [sys.executable, "-m", "dsllm.ops", "build"],
        capture_output=True,
        text=True,
        env=_env(TORCH_EXTENSIONS_DIR=str(root)),
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """As in a new process: no op loaded yet (DeepSpeed never rebuilds one it loaded), the CPU accelerator."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    monkeypatch.setattr(OpBuilder, "_loaded_ops", {})
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


# DeepSpeed's "auto" fields as the trainer fills them, with small numbers
AUTO = {
    "train_batch_size": 1,
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "lr": 1e-3,
    "betas": [0.9, 0.95],
    "weight_decay": 0.01,
    "total_num_steps": 10,
    "warmup_num_steps": 2,
    "cos_min_ratio": 0.1,
    "enabled": False,
    "reduce_bucket_size": 1_000_000,
    "stage3_prefetch_bucket_size": 1_000_000,
    "stage3_param_persistence_threshold": 10_000,
}

# Runs deepspeed.init_distributed and deepspeed.initialize on each config, recording every op DeepSpeed loads;
# optimizer ops are stood in for (no build), the shm op is loaded for real (built by the fixture).
RECORD_LOADS = """
import json, sys, unittest.mock
import torch, deepspeed
from deepspeed.ops.op_builder.builder import OpBuilder
loaded, real_load = [], OpBuilder.load
def load(self, verbose=False):
    loaded.append(self.name)
    return real_load(self, verbose) if self.name == "deepspeed_shm_comm" else unittest.mock.MagicMock()
OpBuilder.load = load
deepspeed.init_distributed(dist_backend="gloo")
result = {"init": list(loaded)}
for name, config in json.loads(sys.argv[1]).items():
    del loaded[:]
    model = torch.nn.Linear(8, 8)
    optimizer = None if "optimizer" in config else torch.optim.AdamW(model.parameters())  # as the trainer does
    deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=optimizer, config=config)
    result[name] = list(loaded)
print(json.dumps(result), flush=True)
# eight engines, some on mocked optimizer ops, are never torn down: leave without the interpreter's exit, which
# aborted now and then on their threads ('terminate called without an active exception') after the answer
import os
os._exit(0)
"""


def _fill_auto(value, key=""):
    if isinstance(value, dict):
        return {k: _fill_auto(v, k) for k, v in value.items()}
    if value == "auto":
        return AUTO[key]
    return value


def test_ops_for_config_are_the_ops_deepspeed_loads_and_built_is_not_rebuilt(built_root, tmp_path, monkeypatch):
    """What DeepSpeed loads in init_distributed and initialize, for every shipped config and two without an op;
    and the shm op, which ops calls built, DeepSpeed loads in a new process without building it again."""
    configs = {path.name: _fill_auto(json.loads(path.read_text())) for path in CONFIGS}
    assert len(configs) == 6
    no_optimizer = {k: v for k, v in configs["zero2.json"].items() if k not in ("optimizer", "scheduler")}
    torch_adam = json.loads(json.dumps(configs["zero2.json"]))
    torch_adam["optimizer"]["params"]["torch_adam"] = True
    configs.update({"no_optimizer": no_optimizer, "torch_adam": torch_adam})
    env = _env(TORCH_EXTENSIONS_DIR=str(built_root), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1") | {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    library, log = built_root / SHM / f"{SHM}.so", built_root / SHM / ".ninja_log"
    before = library.stat().st_mtime_ns, log.read_text()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(built_root))
    assert ops.op_state(SHM).state == "built"
    proc = subprocess.run(
        [sys.executable, "-c", RECORD_LOADS, json.dumps(configs)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (library.stat().st_mtime_ns, log.read_text()) == before, "DeepSpeed rebuilt an op that ops called built"
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded.pop("init") == ops.INIT_OPS
    expected = {name: ops.ops_for_config(config) for name, config in configs.items()}
    assert loaded == expected
    assert expected["zero2.json"] == ["fused_adam"] and expected["zero3_offload.json"] == ["cpu_adam"]
    assert expected["no_optimizer"] == expected["torch_adam"] == []


def test_ops_for_other_optimizers():
    def needs(kind, offload="none", param="none", **params):
        zero = {"stage": 3, "offload_optimizer": {"device": offload}, "offload_param": {"device": param}}
        return ops.ops_for_config({"optimizer": {"type": kind, "params": params}, "zero_optimization": zero})

    assert needs("Adam") == ["fused_adam"]
    assert needs("adamw", "nvme") == ["cpu_adam", "async_io"]
    assert needs("AdamW", param="nvme") == ["fused_adam", "async_io"]
    assert needs("Lion") == ["fused_lion"] and needs("Lion", "cpu") == ["cpu_lion"]
    lion = {"optimizer": {"type": "Lion"}}  # dsllm.engine hands DeepSpeed its CPU Lion on the CPU accelerator
    assert ops.ops_for_config(lion, cpu_accelerator=True) == ["cpu_lion"] == ops.option_ops()
    assert needs("Muon") == ["fused_adam"]  # Muon's AdamW half
    assert needs("Adagrad") == [] and needs("Adagrad", "cpu") == ["cpu_adagrad"]
    assert needs("Lamb") == ["fused_lamb"]
    assert needs("AdamW", "cpu", torch_adam=True) == []
    legacy = {"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2, "cpu_offload": True}}
    assert ops.ops_for_config(legacy) == ["cpu_adam"]


def test_built_op_is_silent(built_root, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(built_root))
    lines = []
    assert ops.announce_builds(lines.append, [SHM]) == [] and lines == []
    assert ops.prebuild([SHM], log=lines.append) == {}
    assert lines == [f"{SHM}: already built in {built_root / SHM}"]


def test_a_rank_without_the_virtualenv_on_path_still_runs_its_ninja(built_root, tmp_path, monkeypatch):
    """A rank that pdsh or mpirun starts over ssh has the remote shell's PATH: another ninja first (or none), whose
    build log hash differs, rebuilt every op it loaded and the next run rebuilt them back (the pdsh test paid ~1 min
    of builds, the test after it as much). The virtualenv's ninja comes first again, and the built op stays silent."""
    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text(f"#!/bin/sh\ntouch {tmp_path / 'ran'}\nexit 1\n")
    (other / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", f"{other}:/usr/bin:/bin")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(built_root))
    lines = []
    assert ops.announce_builds(lines.append, [SHM]) == [] and lines == []
    assert os.path.samefile(shutil.which("ninja"), Path(sys.prefix, "bin", "ninja"))
    assert not (tmp_path / "ran").exists()
    assert ops.use_venv_ninja() is None  # once first, it stays where it is


def test_one_line_per_op_to_build_and_nothing_built(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lines = []
    states = ops.announce_builds(lines.append, [SHM, "fused_adam", SHM])
    assert [state.name for state in states] == [SHM, "fused_adam"] and len(lines) == 2
    for name, line in zip([SHM, "fused_adam"], lines):
        assert line.startswith(f"building DeepSpeed op {name} in {tmp_path / name}, once (about ")
        assert f"{ops.CPU_BUILD_SECONDS[name]} s on 2 idle cores" in line and "python -m dsllm.ops build" in line
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("build.ninja"))


def test_another_build_rebuilds_and_a_lock_waits(built_root, tmp_path, monkeypatch):
    """The build folder of another virtualenv (other sources or flags), an unfinished build, a build in progress."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / SHM
    shutil.copytree(built_root / SHM, folder)  # with its times: a built op anywhere is built
    lines = []
    assert ops.announce_builds(lines.append, [SHM]) == [] and lines == []

    build_file = folder / "build.ninja"
    original = build_file.read_text()
    build_file.write_text(original.replace(" -O2 ", " -O1 "))
    ops.announce_builds(lines.append, [SHM])
    assert lines == [
        f"rebuilding DeepSpeed op {SHM} in {folder}, once (about 30 s on 2 idle cores, several minutes on busy ones); "
        "the build there was made from other sources, flags or torch; `python -m dsllm.ops build` does it ahead "
        "of a run"
    ]

    build_file.write_text(original)
    (folder / f"{SHM}.so").unlink()
    lines.clear()
    ops.announce_builds(lines.append, [SHM])
    assert len(lines) == 1 and "rebuilding" in lines[0] and "its sources changed or a build did not finish" in lines[0]

    lock = folder / "lock"
    lock.touch()
    lines.clear()
    ops.announce_builds(lines.append, [SHM])
    assert lines == [f"waiting for DeepSpeed op {SHM}: another process is building it in {folder}"]
    old = time.time() - 3600
    os.utime(lock, (old, old))
    lines.clear()
    ops.announce_builds(lines.append, [SHM])
    assert len(lines) == 1 and "60 min old" in lines[0] and f"delete {lock}" in lines[0]


def test_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import dsllm.ops, sys; print(sorted({'torch', 'deepspeed'} & set(sys.modules)))"],
        capture_output=True,
        text=True,
    )
    assert proc.stdout.strip() == "[]", proc.stderr  # --help and the import stay fast
    command = [sys.executable, "-m", "dsllm.ops"]
    env = _env(TORCH_EXTENSIONS_DIR=str(tmp_path))
    proc = subprocess.run(
        [*command, "status", str(ROOT / "ds_configs/zero2_offload.json")], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"{SHM}: missing in {tmp_path / SHM}",
        f"cpu_adam: missing in {tmp_path / 'cpu_adam'}",
        f"cpu_lion: missing in {tmp_path / 'cpu_lion'}",  # --optimizer lion's, on the CPU accelerator
    ]
    (tmp_path / "bad.json").write_text("[1, 2")
    proc = subprocess.run([*command, "build", str(tmp_path / "bad.json")], capture_output=True, text=True, env=env)
    assert_user_error(proc, "bad.json: not a readable DeepSpeed JSON", "pass files like ds_configs/zero2.json")
    assert not list(tmp_path.rglob("build.ninja"))


def test_failure_cause_printed_as_it_happens(pytester):
    """A run cut short after a failure (here the next test kills pytest) still shows why the test failed."""
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(
        test_cut="""
        import os

        def test_fails():
            assert 1 + 1 == 3, "the cause, printed at once"

        def test_killed():
            os._exit(1)
        """
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [
            "FAILED test_cut.py::test_fails",
            "test_cut.py:4: in test_fails",
            '*assert 1 + 1 == 3, "the cause, printed at once"',
            "E   AssertionError: the cause, printed at once",
        ]
    )
    pytester.makepyfile(test_cut="def test_fails():\n    assert 1 + 1 == 3\n")  # the end summary stays
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    text = result.stdout.str()
    assert text.count("assert 1 + 1 == 3") >= 2 and "= FAILURES =" in text and "1 failed" in text


@pytest.mark.parametrize("value", [None, "", "9.0", "8.0;9.0+PTX", "8.6 9.0", " 9.0 "])
def test_cuda_arch_lists_deepspeed_builds_with_pass(value, monkeypatch):
    ops.check_cuda_arch_list(value)
    if value and value.strip():  # and DeepSpeed's own CUDA builder takes them
        from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
        builder = FusedAdamBuilder()
        builder.jit_mode = True
        builder.compute_capability_args()  # in JIT mode it rewrites the list for torch's own -gencode flags
        assert "9.0" in os.environ["TORCH_CUDA_ARCH_LIST"]


def test_a_cuda_arch_list_deepspeed_cannot_parse_is_one_line(monkeypatch):
    """An H200 image exported TORCH_CUDA_ARCH_LIST with a "9.0a" entry: DeepSpeed's FusedAdam build stopped every
    ZeRO run with a bare ValueError; dsllm says what to set instead."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    builder = FusedAdamBuilder()
    builder.jit_mode = True
    with pytest.raises(ValueError):
        builder.compute_capability_args()
    with pytest.raises(ops.UserError, match=r"TORCH_CUDA_ARCH_LIST='9.0a'.*not '9.0a'; set TORCH_CUDA_ARCH_LIST"):
        ops.check_cuda_arch_list("9.0a")
