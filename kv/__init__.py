"""
The KV-cache family: what attention layers remember of the text, and how it is compressed.

  cache.py     the protocol (update, attend, size_bits), the one mask rule, the plain cache
  quant.py     the int8 / fp8 / int4 / int2 formats keys and values are stored in
  quant_cache.py  QuantKVCache: old tokens as codes, the newest in full precision
  evict.py     eviction to a token budget: recency (window) or attention score (h2o)
  static.py    the same caches at static shapes, for the compiled decode step (generate.py)
  xl.py        TransformerXL memory for training
  qat.py       quantization-aware training: the cache's rounding in the training forward
  policy.py    KVOptions: every kv_* option of the scripts, and the caches they make
  peak.py      the peak bits a decode holds, counted without decoding
  evaluate.py  eval_kv's passes over held-out streams
  report.py    eval_kv's tables, CSV, frontier plot and TensorBoard scalars
  study_*.py   kv_study's variants, fine-tunes and frontier
"""
