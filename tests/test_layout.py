"""The layout's rules, checked on the source: one import namespace, no service
importing another service or the driver, no import cycles; the wheel installs
``editrl`` alone with its presets and assets; the reward server and the dataset
agree on the checkable edit types."""
import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOMS = {  # subpackage of editrl -> folder of the repository
    "cluster": "cluster", "rollout_workers": "rollout_workers", "reward_server": "reward_server", "learner": "learner",
    "policy": "policy", "protocol": "protocol", "tools": "tools",
}
SERVICES = ("rollout_workers", "reward_server", "learner")
SHARED = ("policy", "protocol")
TOP_LEVEL_NAMES = set(ROOMS) | {"bench", "scripts"}


def _modules() -> dict[str, Path]:
    """Module name (``editrl.<room>.<...>``) -> file, for every module of the package."""
    modules = {}
    for path in sorted((ROOT / "editrl").rglob("*.py")):
        modules[".".join(("editrl", *path.relative_to(ROOT / "editrl").with_suffix("").parts)).removesuffix(".__init__")] = path
    for room, folder in ROOMS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            modules[".".join(("editrl", room, *parts)).removesuffix(".__init__")] = path
    return modules


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names this file imports (relative imports resolved), at any depth of the file."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _room(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "editrl" and parts[1] in ROOMS else None


def test_every_module_imports_project_code_through_the_editrl_namespace():
    modules = _modules()
    files = list(modules.items()) + [(f"bench.{p.stem}", p) for p in (ROOT / "bench").glob("*.py")] + \
        [(f"tests.{p.stem}", p) for p in (ROOT / "tests").glob("*.py")] + [(f"scripts.{p.stem}", p) for p in (ROOT / "scripts").glob("*.py")]
    stray = sorted(f"{path.relative_to(ROOT)}: {name}" for module, path in files for name in _imports(path, module)
                   if name.split(".")[0] in TOP_LEVEL_NAMES - {"bench"})
    assert not stray, "import these through editrl.<room>:\n" + "\n".join(stray)


def test_no_service_imports_another_service_or_the_driver():
    offences = []
    for module, path in _modules().items():
        room = _room(module)
        if room not in SERVICES + SHARED:
            continue
        for name in _imports(path, module):
            other = _room(name)
            if other is not None and other != room and other not in SHARED:
                offences.append(f"{module} imports {name}")
            if room in SHARED and other is not None and other not in SHARED:
                offences.append(f"{module} (shared) imports {name}")
    assert not offences, "\n".join(offences)


def test_the_reward_server_imports_no_policy_code():
    for module, path in _modules().items():
        if _room(module) == "reward_server":
            assert not [n for n in _imports(path, module) if _room(n) == "policy"], module


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {m: {n for n in _imports(p, m) if n in modules and n != m} | {n.rpartition(".")[0] for n in _imports(p, m)
             if n.rpartition(".")[0] in modules and n.rpartition(".")[0] != m} for m, p in modules.items()}
    # a package's __init__ is a parent of its modules, not an import edge between them
    for m in graph:
        graph[m] = {n for n in graph[m] if not m.startswith(n + ".")}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "active"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "active":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_checkable_edit_types_are_one_list_for_the_dataset_and_the_reward_server():
    from editrl.protocol.dataset import load_prompts
    from editrl.protocol.edits import CHECKABLE_EDIT_TYPES
    from editrl.reward_server.backends.pixel import _EDIT_PATTERNS, EDIT_TARGETS, detect_edit_type

    assert set(EDIT_TARGETS) == set(_EDIT_PATTERNS) == set(CHECKABLE_EDIT_TYPES)
    rows = [r for split in ("train", "heldout") for r in load_prompts(ROOT / "assets" / "clips" / f"prompts_{split}.parquet")]
    checkable = [r for r in rows if r.checkable]
    assert {r.edit_type for r in checkable} == set(CHECKABLE_EDIT_TYPES)
    # the reward server never takes a checkable instruction of the bundled data for another edit type
    # (19 of the 96, e.g. "Boost the colour saturation", it does not recognise at all: no instruction-following score)
    wrong = [(r.instruction, r.edit_type, detect_edit_type(r.instruction)) for r in checkable
             if detect_edit_type(r.instruction) not in (None, r.edit_type)]
    assert not wrong


@pytest.mark.slow
def test_the_wheel_installs_editrl_alone_and_runs_from_anywhere(tmp_path):
    # build from a copy of the project's files, so that the build leaves nothing in the checkout
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    source = tmp_path / "source"
    for name in listed.stdout.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(wheels), str(source)],
                   check=True, timeout=300, cwd=tmp_path)
    [wheel] = wheels.glob("editrl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"editrl"}
    tracked = subprocess.run(["git", "ls-files", "configs", "assets"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    if tracked:  # a checkout: every preset and asset is package data
        assert {f"editrl/{name}" for name in tracked} <= set(names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site), str(wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import editrl, editrl.cluster.config as c, editrl.resources as r;"
        "cfg = c.with_resolved_paths(c.load_train_config('configs/default.yaml'));"
        "print(editrl.__file__); print(cfg.policy.checkpoint); print(cfg.data.train_prompts); print(r.checkout_root())"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    package_file, checkpoint, prompts, checkout = out.stdout.split()
    assert package_file.startswith(str(site)) and checkout == "None"
    assert Path(checkpoint, "transformer").is_dir() and checkpoint.startswith(str(site / "editrl" / "assets"))
    assert Path(prompts).is_file() and prompts.startswith(str(site / "editrl" / "assets"))
    help_out = subprocess.run([sys.executable, "-m", "editrl", "--help"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert help_out.returncode == 0 and "train" in help_out.stdout, help_out.stderr
