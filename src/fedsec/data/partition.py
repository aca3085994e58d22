"""Dividing a dataset between hospitals: the partitioners a scenario names.

``federation.partition: {name: dirichlet, alpha: 0.5}`` becomes
``make_partitioner("dirichlet", alpha=0.5)``; its :meth:`Partitioner.split` returns, for
every hospital, the indices of its training and test samples.

All partitioners except ``natural`` work through one hospital x class count table
``C[n_hospitals, n_classes]``: they differ only in the real-valued table they aim for
(equal shares, Dirichlet label skew, Dirichlet sizes); the table is rounded to integers
that add up to exactly the class counts, then each class's samples (shuffled, seeded) are
dealt out by the table. So every sample goes to exactly one hospital. The test set is
divided by the same per-class shares as the training set (a hospital holding 30% of the
training "normal" images holds 30% of the test "normal" images): each hospital's test set
reflects its own label distribution and the union of the test parts is the whole test set.

Multi-label targets ``[N, K]`` are partitioned by a single *stratum* per sample: the
first positive label column, or ``K`` for a sample with no positive label (ChestMNIST's
"no finding" majority), see :func:`stratum_labels`.
"""

from __future__ import annotations

import inspect

import numpy as np

from fedsec.errors import FedsecError
from fedsec.registry import PARTITIONERS, check_options

# Tags separate the random streams so that, for one seed, drawing the table and dealing
# the train / test samples never reuse the same numbers.
_STREAM_TABLE, _STREAM_TRAIN, _STREAM_TEST, _STREAM_ROUND = 1, 2, 3, 4


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**63, 0xFED5EC, stream])


def stratum_labels(labels) -> np.ndarray:
    """Labels as one int64 stratum per sample, ``[N]``.

    ``[N]`` class indices pass through; ``[N, 1]`` is flattened; multi-label ``[N, K]``
    0/1 rows map to their first positive column, and all-negative rows to ``K``.
    """
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 1:
        if y.size and (y.min() < 0 or not np.all(y == np.round(y))):
            raise FedsecError("labels must be class indices >= 0 to be partitioned")
        return y.astype(np.int64)
    if y.ndim != 2:
        raise FedsecError(f"labels have shape {y.shape}; expected [N] or [N, K]")
    positive = y > 0.5
    return np.where(positive.any(axis=1), positive.argmax(axis=1), y.shape[1]).astype(np.int64)


def _fit_margins(q: np.ndarray, rows: np.ndarray, cols: np.ndarray, iters: int = 2000) -> np.ndarray:
    """Iterative proportional fitting: the table closest to ``q`` (in KL) with the given
    row and column sums. It keeps the cross-ratios of ``q``, i.e. how much more of class k
    hospital i has than hospital j, which is what "label skew" means, while matching the
    dataset's real class totals exactly."""
    # A floor keeps every cell reachable: Dirichlet draws at small alpha underflow to 0,
    # and a class no hospital "wants" must still go somewhere.
    t = np.maximum(q.astype(np.float64), 1e-12)
    t[:, cols == 0] = 0.0
    for _ in range(iters):
        t *= (rows / np.maximum(t.sum(axis=1), 1e-300))[:, None]
        t *= (cols / np.maximum(t.sum(axis=0), 1e-300))[None, :]
        if np.abs(t.sum(axis=1) - rows).max() < 1e-6:
            break
    return t


def _round_table(target: np.ndarray, cols: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer table with column sums exactly ``cols`` and each cell the floor or ceiling of
    ``target``; the leftover units of a column go to the hospitals furthest below their row
    total (plus the cell's fractional part), so row totals stay within about one sample."""
    n, k = target.shape
    counts = np.floor(target + 1e-9).astype(np.int64)
    row_goal = target.sum(axis=1)
    for c in range(k):
        rest = int(cols[c] - counts[:, c].sum())
        frac = target[:, c] - np.floor(target[:, c] + 1e-9)
        deficit = row_goal - counts.sum(axis=1)
        tiebreak = rng.random(n)
        if rest > 0:
            order = np.lexsort((tiebreak, -(deficit + frac)))
            counts[order[:rest], c] += 1
        elif rest < 0:  # only from floating-point slop: take back from the most over-full
            order = [j for j in np.lexsort((tiebreak, deficit + frac)) if counts[j, c] > 0]
            counts[order[:-rest], c] -= 1
    return counts


def _test_table(train_counts: np.ndarray, test_cols: np.ndarray) -> np.ndarray:
    """Give each hospital the same share of every class in test as it got in training.

    Each hospital's test labels then follow its own training distribution, reweighted only
    by the dataset's own train -> test label shift (PneumoniaMNIST: 26% normal in train,
    37.5% in test), and the parts add up to the whole test set. A class absent from
    training is shared by hospital size.
    """
    train_cols = train_counts.sum(axis=0)
    by_size = train_counts.sum(axis=1) / max(train_counts.sum(), 1)
    share = np.where(train_cols > 0, train_counts / np.maximum(train_cols, 1), by_size[:, None])
    return share * test_cols[None, :]


def _deal(strata: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle each class's indices and hand out ``counts[:, c]`` of them to each hospital."""
    parts: list[list[np.ndarray]] = [[] for _ in range(counts.shape[0])]
    for c in range(counts.shape[1]):
        idx = rng.permutation(np.flatnonzero(strata == c))
        for h, chunk in enumerate(np.split(idx, np.cumsum(counts[:, c])[:-1])):
            parts[h].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


class Partitioner:
    """Base class. Subclasses set ``name`` and implement :meth:`_table` (or :meth:`split`).

    Constructor keyword arguments are exactly the options under ``federation.partition``.
    """

    name = ""

    def split(
        self,
        train_labels: np.ndarray,
        test_labels: np.ndarray,
        n_hospitals: int,
        seed: int,
        train_sites=None,
        test_sites=None,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Index arrays per hospital, ``(train_parts, test_parts)``, each a list of
        ``n_hospitals`` sorted int64 arrays that together cover ``0..N-1`` exactly once.

        ``train_labels`` / ``test_labels``: ``[N]`` class indices or ``[N, K]`` multi-label.
        ``train_sites`` / ``test_sites``: ``[N]`` site names, used by ``natural`` only.
        Raises :class:`FedsecError` naming the option when a hospital would be left empty.
        """
        _check_hospitals(n_hospitals)
        train = stratum_labels(train_labels)
        test = stratum_labels(test_labels)
        k = int(max(train.max(initial=-1), test.max(initial=-1))) + 1
        train_cols = np.bincount(train, minlength=k)
        test_cols = np.bincount(test, minlength=k)
        round_rng = _rng(seed, _STREAM_ROUND)
        target = self._table(train_cols, n_hospitals, _rng(seed, _STREAM_TABLE))
        train_c = _round_table(target, train_cols, round_rng)
        test_c = _round_table(_test_table(train_c, test_cols), test_cols, round_rng)
        self._check_nonempty(train_c.sum(axis=1), "training", n_hospitals, len(train))
        self._check_nonempty(test_c.sum(axis=1), "test", n_hospitals, len(test))
        return (
            _deal(train, train_c, _rng(seed, _STREAM_TRAIN)),
            _deal(test, test_c, _rng(seed, _STREAM_TEST)),
        )

    def hospital_names(self, n_hospitals: int, train_sites=None, test_sites=None) -> list[str]:
        """Display names, in the order of :meth:`split`'s parts."""
        return [f"hospital_{i}" for i in range(n_hospitals)]

    def options(self) -> dict:
        """The options this partitioner was made with (for the resolved scenario / reports)."""
        return {p: getattr(self, p) for p in _option_names(type(self))}

    # --- for subclasses -------------------------------------------------------------
    def _table(self, train_cols: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """The real-valued hospital x class table ``[n, K]`` to aim for in training; its
        columns must add up to ``train_cols``."""
        raise NotImplementedError

    def _culprit(self) -> tuple[str, str]:
        """(the setting to name, the advice) for an empty-hospital error."""
        return f"federation.partition.name={self.name}", "lower federation.hospitals"

    def _check_nonempty(self, sizes: np.ndarray, phase: str, n: int, total: int) -> None:
        empty = np.flatnonzero(sizes == 0)
        if empty.size:
            if total < n:  # no partition option can fix this, only fewer hospitals
                setting, advice = f"federation.hospitals={n}", "lower federation.hospitals"
            else:
                setting, advice = self._culprit()
            raise FedsecError(
                f"{setting} leaves hospital {int(empty[0])} with no {phase} samples "
                f"({total} {phase} samples over federation.hospitals={n}); {advice}"
            )


def _option_names(cls: type) -> list[str]:
    """A partitioner's options are its constructor's keyword parameters."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]


def _check_hospitals(n_hospitals) -> None:
    if not isinstance(n_hospitals, (int, np.integer)) or isinstance(n_hospitals, bool) or n_hospitals < 1:
        raise FedsecError(f"federation.hospitals={n_hospitals!r}; expected an integer >= 1")


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha <= 0:
        raise FedsecError(f"federation.partition.alpha={alpha!r}; expected a number > 0")
    return float(alpha)


@PARTITIONERS.register("iid")
class IidPartitioner(Partitioner):
    """``iid``: every hospital gets an equal share of every class (sizes differ by at most
    about one sample per class) — the no-heterogeneity baseline."""

    name = "iid"

    def _table(self, train_cols, n, rng):
        return np.tile(train_cols / n, (n, 1))


@PARTITIONERS.register("dirichlet")
class DirichletPartitioner(Partitioner):
    """``dirichlet``: label skew at equal hospital sizes.

    Each hospital i draws its class proportions ``q_i ~ Dir(alpha * 1_K)`` (as in Hsu et al.
    2019, "Measuring the effects of non-identical data distribution"). The table
    ``q`` is then fitted (iterative proportional fitting) to equal row totals and the
    dataset's class totals, which keeps the skew (the cross-ratios of ``q``) while every
    sample is used once. In test each hospital gets the same share of every class as in
    training, so its test labels follow its own distribution. Small alpha (0.1) is strong skew
    (nearly one class per hospital); large alpha (100) is close to ``iid``.

    Note: the per-class convention of NIID-Bench / Flower Datasets (each class split over
    hospitals by ``Dir(alpha * 1_n)``, unequal sizes) gives different skew for the same alpha.
    """

    name = "dirichlet"

    def __init__(self, alpha: float = 0.5):
        self.alpha = _check_alpha(alpha)

    def _table(self, train_cols, n, rng):
        q = rng.dirichlet(np.full(len(train_cols), self.alpha), size=n)
        cols = train_cols.astype(np.float64)
        return _fit_margins(q, np.full(n, cols.sum() / n), cols)

    def _culprit(self):
        return f"federation.partition.alpha={self.alpha:g}", "raise alpha or lower federation.hospitals"


@PARTITIONERS.register("quantity")
class QuantityPartitioner(Partitioner):
    """``quantity``: skewed hospital sizes, no label skew.

    Hospital shares ``pi ~ Dir(alpha * 1_n)``; hospital i gets ``pi_i`` of every class, in
    training and test alike. Small alpha: a few large hospitals and many small ones;
    large alpha: near-equal sizes.
    """

    name = "quantity"

    def __init__(self, alpha: float = 1.0):
        self.alpha = _check_alpha(alpha)

    def _table(self, train_cols, n, rng):
        return np.outer(rng.dirichlet(np.full(n, self.alpha)), train_cols)

    def _culprit(self):
        return f"federation.partition.alpha={self.alpha:g}", "raise alpha or lower federation.hospitals"


@PARTITIONERS.register("natural")
class NaturalPartitioner(Partitioner):
    """``natural``: one hospital per real site (the data's own per-sample site labels).

    Hospitals are the sorted distinct site names; ``federation.hospitals`` must equal their
    number. The seed plays no part: the split is the data's own.
    """

    name = "natural"

    def _sites(self, train_sites, test_sites) -> tuple[np.ndarray, np.ndarray, list]:
        if train_sites is None or test_sites is None:
            raise FedsecError(
                "federation.partition.name=natural needs per-sample hospital sites, and this data "
                "source has none; use a source with sites (a MedNIST-style root/<site>/<class>/ "
                "folder) or another partition (iid, dirichlet, quantity)"
            )
        train_sites, test_sites = np.asarray(train_sites), np.asarray(test_sites)
        names = sorted(set(train_sites.tolist()) | set(test_sites.tolist()), key=str)
        return train_sites, test_sites, names

    def hospital_names(self, n_hospitals, train_sites=None, test_sites=None):
        return [str(s) for s in self._sites(train_sites, test_sites)[2]]

    def split(self, train_labels, test_labels, n_hospitals, seed, train_sites=None, test_sites=None):
        _check_hospitals(n_hospitals)
        train_sites, test_sites, names = self._sites(train_sites, test_sites)
        if len(train_sites) != len(train_labels) or len(test_sites) != len(test_labels):
            raise FedsecError(
                f"natural partition: {len(train_sites)}/{len(test_sites)} site labels for "
                f"{len(train_labels)}/{len(test_labels)} train/test samples; expected one per sample"
            )
        if n_hospitals != len(names):
            raise FedsecError(
                f"federation.hospitals={n_hospitals} but the natural partition has {len(names)} sites "
                f"({', '.join(map(str, names))}); set federation.hospitals={len(names)}"
            )
        train = [np.flatnonzero(train_sites == s).astype(np.int64) for s in names]
        test = [np.flatnonzero(test_sites == s).astype(np.int64) for s in names]
        for parts, phase in ((train, "training"), (test, "test")):
            for h, p in enumerate(parts):
                if p.size == 0:
                    raise FedsecError(
                        f"federation.partition.name=natural leaves hospital {h} (site '{names[h]}') "
                        f"with no {phase} samples; give that site {phase} data or drop it"
                    )
        return train, test


def make_partitioner(name: str, **options) -> Partitioner:
    """``make_partitioner("dirichlet", alpha=0.5)``; unknown names or options raise
    :class:`ScenarioError` naming ``federation.partition.<key>`` with a "did you mean"."""
    cls = PARTITIONERS.get(name, key="federation.partition.name")
    check_options(cls, options, "federation.partition", f"partition '{name}'")
    return cls(**options)
