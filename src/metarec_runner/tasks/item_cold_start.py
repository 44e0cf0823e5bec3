"""Item cold start: one task per ITEM; train, validation and test items are disjoint.

A task holds the ratings of one item by several users. Rows are the usual (user, item)
feature rows from :meth:`Interactions.feature_rows`, so every model works unchanged: it now
adapts to a new item from a few users' ratings and predicts the item's other ratings.
Because each rating belongs to exactly one item, a test item's ratings never appear in any
meta-train or validation task.
"""

from __future__ import annotations

from metarec_runner.tasks.splitters import UserColdStart


class ItemColdStart(UserColdStart):
    """Item cold start: one task per item; train, validation and test items are disjoint.

    Items with between ``min_interactions`` and ``max_interactions`` ratings are shuffled with
    ``seed`` and split by ``ratios``. Each item's ratings are shuffled once with ``seed``; the
    first ``n_query`` form the query set and the rest (or the next ``n_support``) the support
    set. ``task_ids`` are item codes.

    Args:
        ratios: fractions of eligible items for (train, val, test).
        n_query: query ratings per item.
        n_support: support ratings per item; ``None`` = all but the query.
        min_interactions: keep items with at least this many ratings.
        max_interactions: keep items with at most this many (``None`` = no limit).
        seed: the split seed.
        filtered_users: what happens to the items the filters leave out (see
            :class:`UserColdStart`; ``"drop"`` by default here, as before).
    """

    task_key = "item"

    def __init__(
        self,
        ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
        n_query: int = 10,
        n_support: int | None = None,
        min_interactions: int = 13,
        max_interactions: int | None = None,
        seed: int = 0,
        filtered_users: str = "drop",
    ) -> None:
        super().__init__(ratios, n_query, n_support, min_interactions, max_interactions, seed,
                         filtered_users)
