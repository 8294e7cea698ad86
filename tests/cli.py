"""Running the command-line entry points as a user would, without paying a new interpreter's
import of torch + Lightning + Hydra (~5 s) for each run.

- :func:`in_process` runs an entry point (``galaxy_lightning.train.main``, ...) in the test
  process with its own ``sys.argv``, working directory and captured output: what a refusal
  prints and its exit status, through the same ``cli_boundary`` and Hydra machinery as the
  console script. Runs that exit normally or by a refusal can use it.
- :func:`forked` runs ``galaxy-train`` in a child forked from a server process that has
  imported the package once (multiprocessing's forkserver, preloaded): a real process with its
  own signals, exit status and SIGKILL, for the kill and signal tests. The server never computed
  anything, so no OpenMP or other threads are forked.

Tests that must prove the process boundary itself (the console script, its banners and output,
its import path) still start ``python train.py`` with ``subprocess``: one per entry point.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    """What ``subprocess.run(..., capture_output=True, text=True)`` would have returned."""

    returncode: int
    stdout: str
    stderr: str


def _exit_status(err: SystemExit) -> int:
    if err.code is None:
        return 0
    if isinstance(err.code, int):
        return err.code
    print(err.code, file=sys.stderr)  # sys.exit("message"), as the interpreter prints it
    return 1


def in_process(main: Callable[[], object], *args: str, cwd: Path | None = None,
               env: dict[str, str] | None = None, prog: str = "train.py") -> Result:
    """``prog args...`` run by ``main`` in this process: its exit status (0 when it returns),
    stdout and stderr. Logging, Hydra's global state, the working directory and the environment
    are restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved_argv, saved_cwd, saved_env = list(sys.argv), os.getcwd(), dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    GlobalHydra.instance().clear()
    try:
        sys.argv = [prog, *args]
        os.environ.update({"HYDRA_FULL_ERROR": "0", **(env or {})})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exit_:
                code = _exit_status(exit_)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()  # the run's own (its log file): flushed and closed
        root.handlers[:] = handlers
        root.setLevel(level)
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # type: ignore[assignment]
    return Result(code, out.getvalue(), err.getvalue())


# -- forked children for the kill tests ---------------------------------------------------------
#: Children forked from one server that has imported the package (and nothing else running):
#: ``context.Process(...)`` starts in milliseconds instead of seconds.
context = multiprocessing.get_context("forkserver")
context.set_forkserver_preload(["galaxy_lightning.train", "tests.faults"])


def _child(args: list[str], cwd: str, env: dict[str, str], out: str, err: str,
           sigint_default: bool, target: Callable[..., object] | None) -> None:
    """In the forked child: become ``python train.py args`` (or call ``target(*args)``) with its
    own working directory, environment and output files."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    if sigint_default:  # as in a terminal: Ctrl-C raises KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if target is not None:
        target(*args)
        return
    sys.argv = [str(ROOT / "train.py"), *args]
    from galaxy_lightning.train import main  # preloaded: already imported in the server

    main()


class Forked:
    """A child forked from the preloaded server, running: ``python train.py args`` or, given
    ``target``, ``target(*args)``. ``wait()`` gives its :class:`Result` (``returncode``
    negative for a signal, as with subprocess)."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None,
                 sigint_default: bool = False, target: Callable[..., object] | None = None) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        self._files = Path(tempfile.mkdtemp(prefix="forked"))
        self.process = context.Process(
            target=_child, args=(list(args), str(cwd), {**os.environ, **(env or {})},
                                 str(self._files / "out"), str(self._files / "err"),
                                 sigint_default, target))
        self.process.start()

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 600) -> Result:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise TimeoutError(f"the forked child did not finish within {timeout} s")
        # as written: no newline translation, so a carriage return stays visible to the tests
        result = Result(self.process.exitcode, (self._files / "out").read_bytes().decode(),
                        (self._files / "err").read_bytes().decode())
        shutil.rmtree(self._files)
        return result


def forked(*args: str, cwd: Path, env: dict[str, str] | None = None,
           sigint_default: bool = False, timeout: float = 600) -> Result:
    """``python train.py args`` in a forked child; waits for it."""
    return Forked(*args, cwd=cwd, env=env, sigint_default=sigint_default).wait(timeout)
