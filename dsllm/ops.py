"""DeepSpeed's C++ ops, which it compiles on first use: which ones a run needs, whether each is already built,
one line before a build starts (instead of minutes of silence), and a prebuild for `make install`.

DeepSpeed builds an op through `torch.utils.cpp_extension.load`: ninja in `TORCH_EXTENSIONS_DIR/<op>/` (default
`~/.cache/torch_extensions/pyXY_<accelerator>/<op>/`), skipped when ninja finds nothing to do. So an op is built
when that folder's `build.ninja` is the one torch would write now (same sources, flags, torch, CPU) and
`ninja -n` has no work; another virtualenv building into the same folder rewrites it, and the next run rebuilds.
In a virtualenv with no TORCH_EXTENSIONS_DIR set, the builds go into the virtualenv's own `torch_extensions/`
(where `make install` prebuilds them): every virtualenv keeps its own.

    python -m dsllm.ops status ds_configs/zero2.json        # which ops its runs need, and which are built
    python -m dsllm.ops build ds_configs/*.json             # build them now (what `make install` runs)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from dsllm.errors import ArgumentParser, UserError, run_cli

# op name (DeepSpeed's) -> its op builder's class name (resolved per accelerator by DeepSpeed)
BUILDERS = {
    "deepspeed_shm_comm": "ShareMemCommBuilder",
    "fused_adam": "FusedAdamBuilder",
    "cpu_adam": "CPUAdamBuilder",
    "cpu_adagrad": "CPUAdagradBuilder",
    "cpu_lion": "CPULionBuilder",
    "fused_lion": "FusedLionBuilder",
    "fused_lamb": "FusedLambBuilder",
    "async_io": "AsyncIOBuilder",
}
# seconds for one cold build with the CPU accelerator, 2 idle cores (2026-11-29, gcc 12, torch 2.13, DS 0.19.8)
CPU_BUILD_SECONDS = {"deepspeed_shm_comm": 30, "fused_adam": 45, "cpu_adam": 40}
# what `deepspeed.init_distributed` builds: the CPU accelerator's shared-memory all-reduce (no op on GPUs)
INIT_OPS = ["deepspeed_shm_comm"]
# a lock older than this is most likely one a killed build left behind (torch then waits for it forever)
STALE_LOCK_SECONDS = 600


def ops_for_config(ds_config: dict, cpu_accelerator: bool = False) -> list[str]:
    """The ops `deepspeed.initialize` builds for this DeepSpeed JSON (as DeepSpeed picks its optimizer). On the CPU
    accelerator a Lion section runs DeepSpeed's CPU Lion (`dsllm.engine`: FusedLion has no CPU kernel)."""
    optimizer = ds_config.get("optimizer")
    if not isinstance(optimizer, dict):
        return []  # a client optimizer (ours: torch AdamW) needs no op
    kind = str(optimizer.get("type", "")).lower()
    params = optimizer.get("params") or {}
    zero = ds_config.get("zero_optimization")
    zero = zero if isinstance(zero, dict) else {}
    offload = str((zero.get("offload_optimizer") or {}).get("device", "none")).lower()
    if zero.get("cpu_offload") is True:  # DeepSpeed's deprecated spelling of offload_optimizer.device cpu
        offload = "cpu"
    cpu_optimizer = offload in ("cpu", "nvme")
    needs = []
    if kind == "lion" and cpu_accelerator:
        cpu_optimizer = True
    if kind in ("adam", "adamw", "muon") and not params.get("torch_adam", False):
        needs.append("cpu_adam" if cpu_optimizer else "fused_adam")
    elif kind == "adagrad" and cpu_optimizer:
        needs.append("cpu_adagrad")
    elif kind == "lion":
        needs.append("cpu_lion" if cpu_optimizer else "fused_lion")
    elif kind == "lamb":
        needs.append("fused_lamb")
    if "nvme" in (offload, str((zero.get("offload_param") or {}).get("device", "none")).lower()):
        needs.append("async_io")
    return needs


def option_ops() -> list[str]:
    """The ops that pretraining's options add to any JSON's, on this accelerator: --optimizer lion's."""
    from deepspeed.accelerator import get_accelerator

    return ops_for_config({"optimizer": {"type": "Lion"}}, cpu_accelerator=get_accelerator()._name == "cpu")


def use_venv_extensions_dir() -> Path | None:
    """Point TORCH_EXTENSIONS_DIR at the virtualenv's own `torch_extensions/` when it is unset (what the Makefile
    exports and prebuilds); returns the folder, or None when it was already set or this is no virtualenv."""
    if "TORCH_EXTENSIONS_DIR" in os.environ or sys.prefix == sys.base_prefix or not os.access(sys.prefix, os.W_OK):
        return None
    folder = Path(sys.prefix) / "torch_extensions"
    os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)
    return folder


def use_venv_ninja() -> Path | None:
    """Put the virtualenv's bin/ first on PATH when the `ninja` found there is another one (a rank started over ssh,
    by pdsh or mpirun, gets the remote shell's PATH): torch runs ninja for every op it loads, and another ninja
    version reads the build log as stale (ninja 1.11 and 1.13 hash the command differently) and rebuilds the op;
    the next run with the virtualenv's ninja then rebuilds it back. Returns the folder put first, or None."""
    venv_bin = Path(sys.prefix) / "bin"
    ninja = venv_bin / "ninja"
    if sys.prefix == sys.base_prefix or not ninja.is_file():
        return None
    found = shutil.which("ninja")
    if found is not None and os.path.samefile(found, ninja):
        return None
    os.environ["PATH"] = os.pathsep.join([str(venv_bin), *filter(None, [os.environ.get("PATH")])])
    return venv_bin


def extensions_root() -> Path:
    """The folder torch builds extensions under, as `torch.utils.cpp_extension._get_build_directory` finds it."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return Path(root)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


@dataclasses.dataclass
class OpState:
    name: str
    state: str  # built, installed, loaded, unavailable, missing, stale, busy (another process holds the lock)
    folder: Path | None = None
    detail: str = ""
    lock_age: float = 0.0  # seconds since another process took the build lock (state busy)

    @property
    def will_build(self) -> bool:
        return self.state in ("missing", "stale", "busy")


class _Captured(Exception):
    pass


def cache_cpu_info() -> None:
    """DeepSpeed's CPU op builders ask py-cpuinfo twice for every op they load, built or not (a Python subprocess,
    ~1 s each): let this process ask once. The CPU does not change while it runs."""
    try:
        import cpuinfo
    except ImportError:
        return
    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.lru_cache(maxsize=1)(cpuinfo.get_cpu_info)


def _load_arguments(builder) -> dict:
    """The arguments DeepSpeed's `jit_load` passes to torch's `load` (sources, flags), without building."""
    import torch.utils.cpp_extension as cpp_extension

    captured = {}

    def capture(**kwargs):
        captured.update(kwargs)
        # DeepSpeed rewrites TORCH_CUDA_ARCH_LIST for the duration of jit_load (adding +PTX, say) and torch reads it
        # while writing build.ninja: keep the value torch would see, so the expected file matches the real one
        captured["torch_cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
        raise _Captured

    original = cpp_extension.load
    cpp_extension.load = capture  # jit_load imports `load` from the module when it runs
    cache_cpu_info()
    try:
        builder.jit_load(verbose=False)
    except _Captured:
        pass
    finally:
        cpp_extension.load = original
    if not captured:
        raise RuntimeError(f"DeepSpeed's {type(builder).__name__}.jit_load did not call torch's load")
    return captured


@contextlib.contextmanager
def _environment(name: str, value: str | None):
    """Environment variable `name` set to `value` (unset for None) inside the block, restored after."""
    before = os.environ.get(name)
    try:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _expected_build_file(arguments: dict) -> str | None:
    """The build.ninja torch's `load` would write for these arguments (None if torch's internals moved)."""
    import torch.utils.cpp_extension as cpp_extension

    try:
        sources = list(arguments["sources"])
        with_cuda = arguments.get("with_cuda")
        if with_cuda is None:
            with_cuda = any(map(cpp_extension._is_cuda_file, sources))
        with_sycl = arguments.get("with_sycl")
        if with_sycl is None:
            with_sycl = any(map(getattr(cpp_extension, "_is_sycl_file", lambda _: False), sources))
        ldflags = cpp_extension._prepare_ldflags(
            list(arguments.get("extra_ldflags") or []), with_cuda, with_sycl, False, False
        )
        arch_list = arguments.get("torch_cuda_arch_list")
        with tempfile.TemporaryDirectory() as tmp, _environment("TORCH_CUDA_ARCH_LIST", arch_list):
            path = os.path.join(tmp, "build.ninja")
            cpp_extension._write_ninja_file_to_build_library(
                path=path,
                name=arguments["name"],
                sources=sources,
                extra_cflags=list(arguments.get("extra_cflags") or []),
                extra_cuda_cflags=list(arguments.get("extra_cuda_cflags") or []),
                extra_sycl_cflags=list(arguments.get("extra_sycl_cflags") or []),
                extra_ldflags=ldflags,
                extra_include_paths=list(arguments.get("extra_include_paths") or []),
                with_cuda=with_cuda,
                with_sycl=with_sycl,
                is_standalone=False,
            )
            return Path(path).read_text()
    except (AttributeError, TypeError, KeyError):
        return None


def _same_build(existing: str, arguments: dict) -> bool:
    expected = _expected_build_file(arguments)
    if expected is not None:
        return existing == expected
    # torch's internals moved: at least the same sources and flags
    return all(str(item) in existing for item in [*arguments["sources"], *(arguments.get("extra_cflags") or [])])


def op_state(name: str) -> OpState:
    """Whether DeepSpeed would build op `name` (see BUILDERS) when it next loads it, and in which folder."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    builder = get_accelerator().create_op_builder(BUILDERS[name])
    if builder is None or type(builder).__name__ == "NotImplementedBuilder":
        return OpState(name, "unavailable", detail=f"the {get_accelerator()._name} accelerator has no {name} op")
    if name in getattr(type(builder), "_loaded_ops", {}):
        return OpState(name, "loaded")
    if installed_ops.get(name, False) and accelerator_name == get_accelerator()._name:
        return OpState(name, "installed", detail="built when DeepSpeed was installed")
    if not builder.is_compatible(False):
        return OpState(name, "unavailable", detail=f"DeepSpeed cannot build {name} here")
    folder = extensions_root() / name
    lock = folder / "lock"
    if lock.exists():
        return OpState(name, "busy", folder, lock_age=time.time() - lock.stat().st_mtime)
    if shutil.which("ninja") is None:  # DeepSpeed then stops with "ninja not being installed"
        return OpState(name, "unavailable", folder, detail="ninja is not on PATH: activate the virtualenv")
    build_file = folder / "build.ninja"
    if not build_file.is_file():
        return OpState(name, "missing", folder)
    if not _same_build(build_file.read_text(), _load_arguments(builder)):
        return OpState(name, "stale", folder, detail="made from other sources, flags or torch")
    dry_run = subprocess.run(["ninja", "-n"], cwd=folder, capture_output=True, text=True, timeout=60)
    if dry_run.returncode == 0 and "no work to do" in dry_run.stdout:
        return OpState(name, "built", folder)
    return OpState(name, "stale", folder, detail="its sources changed or a build did not finish")


def expected_duration(names: list[str]) -> str:
    """How long building `names` takes once, from measured CPU builds (2 idle cores); a guess elsewhere."""
    from deepspeed.accelerator import get_accelerator

    known = [CPU_BUILD_SECONDS.get(name) for name in names] if get_accelerator()._name == "cpu" else [None]
    if None in known:
        return "a minute or more each, several on busy cores"
    total = sum(known)
    amount = f"{total} s" if total < 120 else f"{total / 60:.0f} minutes"
    return f"about {amount} on 2 idle cores, several minutes on busy ones"


def build_line(state: OpState) -> str:
    """The one line that says a build is about to happen, where, why, and for how long."""
    where = state.folder
    if state.state == "busy":
        hint = (
            f"; its lock is {state.lock_age / 60:.0f} min old: if no build is running (a killed one leaves the lock "
            f"behind and DeepSpeed waits forever), delete {where / 'lock'}"
            if state.lock_age > STALE_LOCK_SECONDS
            else ""
        )
        return f"waiting for DeepSpeed op {state.name}: another process is building it in {where}{hint}"
    verb = "rebuilding" if state.state == "stale" else "building"
    why = f"; the build there was {state.detail}" if state.state == "stale" else ""
    return (
        f"{verb} DeepSpeed op {state.name} in {where}, once ({expected_duration([state.name])}){why}; "
        f"`python -m dsllm.ops build` does it ahead of a run"
    )


def check_cuda_arch_list(value: str | None) -> None:
    """DeepSpeed's CUDA op builds read TORCH_CUDA_ARCH_LIST as MAJOR.MINOR[+PTX] entries and stop with a bare
    ValueError on anything else, such as the "9.0a" of a CUDA image (seen on an H200 image, 2026-11-29)."""
    entries = [e for e in re.split(r"[;\s]+", (value or "").strip()) if e]
    bad = [e for e in entries if not re.fullmatch(r"\d+\.\d+(\+PTX)?", e)]
    if bad:
        raise UserError(
            f"TORCH_CUDA_ARCH_LIST={value!r}: DeepSpeed builds its CUDA ops only for entries like 9.0 or 9.0+PTX, "
            f"not {bad[0]!r}; set TORCH_CUDA_ARCH_LIST to the GPUs' capabilities (9.0 on H100/H200) or unset it"
        )


def _check_accelerator_environment(needs: list[str]) -> None:
    from deepspeed.accelerator import get_accelerator

    if needs and get_accelerator()._name == "cuda":
        check_cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"))


def announce_builds(log: Callable[[str], None], needs: Iterable[str]) -> list[OpState]:
    """Before DeepSpeed loads the ops `needs` (INIT_OPS before `deepspeed.init_distributed`, `ops_for_config(ds)`
    before `deepspeed.initialize`): one `log` line per op it is going to build, nothing for built ones. In a
    virtualenv without TORCH_EXTENSIONS_DIR it first points that at the virtualenv's own prebuilt folder; it puts
    the virtualenv's ninja first on PATH (use_venv_ninja), and it caches py-cpuinfo's answer for the process
    (DeepSpeed's own loads then skip ~2 s per op)."""
    use_venv_extensions_dir()
    use_venv_ninja()
    cache_cpu_info()
    needs = list(dict.fromkeys(needs))
    _check_accelerator_environment(needs)
    states = []
    for name in needs:
        try:
            state = op_state(name)
        except Exception:  # a check that DeepSpeed or torch outgrew must not stop the run it describes
            continue
        if state.will_build:
            log(build_line(state))
            states.append(state)
    return states


def _state_or_missing(name: str) -> OpState:
    try:
        return op_state(name)
    except Exception:  # the check failed (DeepSpeed or torch changed): building is right either way, ninja knows
        return OpState(name, "missing", extensions_root() / name)


def prebuild(names: Iterable[str], log: Callable[[str], None] = print) -> dict[str, float]:
    """Build the ops `names` now (a built one costs a ninja dry run): one line for what is already there, one for
    what it builds, where and for how long, one per build done; returns each build's seconds."""
    from deepspeed.accelerator import get_accelerator

    use_venv_extensions_dir()
    use_venv_ninja()
    cache_cpu_info()
    names = list(dict.fromkeys(names))
    _check_accelerator_environment(names)
    states = [_state_or_missing(name) for name in names]
    for state in states:
        if state.state == "busy":
            log(build_line(state))
        elif not state.will_build:
            where = f" in {state.folder}" if state.folder else ""
            what = "already built" if state.state == "built" else state.state
            log(f"{state.name}: {what}{where}" + (f" ({state.detail})" if state.detail else ""))
    to_build = [state for state in states if state.will_build]
    if to_build:
        names = [state.name for state in to_build]
        log(
            f"building DeepSpeed ops {', '.join(names)} in {extensions_root()}, once "
            f"({expected_duration(names)}); runs from this virtualenv reuse them"
        )
    seconds = {}
    for state in to_build:
        start = time.monotonic()
        try:
            get_accelerator().create_op_builder(BUILDERS[state.name]).jit_load(verbose=False)
        except RuntimeError as err:
            lines = str(err).splitlines() or [repr(err)]
            first = next((line for line in lines if "error" in line.lower()), lines[0])
            raise UserError(
                f"building DeepSpeed op {state.name} in {state.folder} failed: {first.strip()[:300]}; "
                "it needs a C++ compiler (g++) and ninja on PATH"
            ) from None
        seconds[state.name] = time.monotonic() - start
        log(f"{state.name}: built in {state.folder} in {seconds[state.name]:.0f} s")
    return seconds


def _config_needs(paths: list[str]) -> list[str]:
    needs = list(INIT_OPS)
    for path in paths:
        try:
            ds_config = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise UserError(
                f"{path}: not a readable DeepSpeed JSON ({err}); pass files like ds_configs/zero2.json"
            ) from None
        if not isinstance(ds_config, dict):
            raise UserError(f"{path}: a DeepSpeed JSON is an object {{...}}, not {type(ds_config).__name__}")
        needs += ops_for_config(ds_config)
    return list(dict.fromkeys(needs + (option_ops() if paths else [])))


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m dsllm.ops",
        description="DeepSpeed's C++ ops that runs compile on first use: list them, or build them now.\n"
        "The ops are those deepspeed.init_distributed builds plus those the given DeepSpeed JSONs' optimizers need\n"
        "(and --optimizer lion's).",
    )
    parser.add_argument("action", choices=["status", "build"], help="status: say which are built; build: build them")
    parser.add_argument("ds_configs", nargs="*", metavar="DS_CONFIG", help="DeepSpeed JSON files whose runs to prepare")
    parser.add_argument(
        "--op", action="append", default=[], choices=sorted(BUILDERS), help="an op to include by name (repeatable)"
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    needs = list(dict.fromkeys(_config_needs(args.ds_configs) + args.op))
    if args.action == "build":
        prebuild(needs, log=lambda line: print(line, flush=True))
        return 0
    use_venv_extensions_dir()
    use_venv_ninja()
    for name in needs:
        state = op_state(name)
        where = f" in {state.folder}" if state.folder else ""
        print(f"{name}: {state.state}{where}" + (f" ({state.detail})" if state.detail else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
