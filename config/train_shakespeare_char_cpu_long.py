# The long-context CPU recipe: the CPU recipe's model (4 layers x 4 heads x 128) with a
# 256-byte context (the default base of kv_study.py). About 220 ms per iteration at
# --threads=1 on a lightly loaded 2-core CPU, so 4000 iterations take about 15 minutes there
# (much longer on a busy machine: see RESULTS.md, "The KV study").
#   python train.py config/train_shakespeare_char_cpu_long.py --threads=1
#   python kv_study.py --base=out-shakespeare-char-cpu-long

out_dir = "out-shakespeare-char-cpu-long"
eval_interval = 500
eval_iters = 20  # 20 x 12 rows x 256 bytes: as many bytes per estimate as the CPU recipe's
log_interval = 50

dataset = "shakespeare_char"
batch_size = 12
block_size = 256  # 4x the CPU recipe's (at 2000 iterations val 1.574 vs 1.714 at block 64)

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # too small to overfit in this many iterations

learning_rate = 2e-3
max_iters = 4000
lr_decay_iters = 4000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

device = "cpu"
