"""Progress bars that cost nothing when they are not shown.

tqdm builds its machinery even for a bar it hides (disable=True): its first bar starts a monitor
thread that lives as long as the process, and makes a multiprocessing lock, which under the "spawn"
or "forkserver" start method launches multiprocessing's resource-tracker process. An encode that
shows no bar must leave no thread and no process behind in the service that called it."""
from __future__ import annotations


class HiddenBar:
    """Takes the calls audioenc makes on a tqdm bar and shows nothing."""

    def __init__(self):
        self.n = 0

    def __enter__(self) -> HiddenBar:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str = "") -> None:
        pass


def progress_bar(show: bool, **tqdm_args):
    """A tqdm bar made with ``tqdm_args`` when ``show``, else a HiddenBar."""
    if not show:
        return HiddenBar()
    from tqdm import tqdm

    return tqdm(**tqdm_args)
