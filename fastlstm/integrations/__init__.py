"""Scoring with fastlstm on cluster engines: ``fastlstm.integrations.dask`` and ``fastlstm.integrations.ray``.

Each module imports its engine only when imported itself (``pip install fastlstm[dask]`` or
``fastlstm[ray]``). Both ship the model the same way: a ``Model`` pickles as its native file's bytes and
load options, and each worker process prepares it once (``fastlstm.model.restore_model``).
"""
