"""The core and the harness import without matplotlib, tqdm or scikit-learn; the console script is the harness's."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
import ntkdyn, ntkdyn.experiments, ntkdyn.experiments.cli
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("matplotlib", "tqdm", "sklearn"))
print(",".join(heavy))
"""


def test_import_loads_no_plotting_progress_or_sklearn():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ""


def test_modules_are_not_shadowed_by_functions():
    import ntkdyn.experiments as ex

    for name in ("data", "train", "compare", "sweep", "report"):
        assert type(getattr(ex, name)).__name__ == "module", name
    assert callable(ex.train.train) and callable(ex.compare.compare) and callable(ex.sweep.sweep)


def test_console_script_entry_point_is_the_experiments_cli():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "ntkdyn"]
    assert script.value == "ntkdyn.experiments.cli:main"
