"""
The KV-cache family: what attention layers remember of the text, and how it is compressed.

  cache.py   the protocol (update, attend, size_bits), the one mask rule, the plain cache
  quant.py   keys and values stored as int8 / fp8 / int4 / int2 codes
  evict.py   eviction to a token budget: recency (window) or attention score (h2o)
  xl.py      TransformerXL memory for training
  policy.py  KVOptions: every kv_* option of the scripts, and the caches they make
  report.py  eval_kv's tables, CSV, frontier plot and TensorBoard scalars
"""
