"""Serving trained checkpoints: the item catalog (raw ids), micro-batching,
and the HTTP server of ``plr serve`` (needs ``pip install ".[serve]"``)."""

from .catalog import ItemCatalog, UnknownItemsError
from .microbatch import MicroBatcher
from .recommender import Query, Recommender, RequestError, load_recommender

__all__ = ["ItemCatalog", "MicroBatcher", "Query", "Recommender", "RequestError", "UnknownItemsError",
           "load_recommender"]
