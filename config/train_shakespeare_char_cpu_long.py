# The long-context CPU recipe: the CPU recipe's model (4 layers x 4 heads x 128) with a
# 256-byte context (the default base of kv_study.py). At --threads=1 on our 2-core CPU VM, 4000
# iterations took 15 minutes in one session (two seeds side by side, ~220 ms per iteration) and 27
# in another (the same two, ~390 ms; 330 ms with nothing else running, i.e. 22 minutes alone):
# the VM's speed varies, and a busy machine is much slower (RESULTS.md, "The KV study").
#   python train.py config/train_shakespeare_char_cpu_long.py --threads=1
#   python kv_study.py --base=out-shakespeare-char-cpu-long

out_dir = "out-shakespeare-char-cpu-long"
eval_interval = 500
eval_iters = 20  # 20 batches x 12 windows of 256 bytes per estimate (61,440; the CPU recipe's 50 x 12 x 64 is 38,400)
log_interval = 50

dataset = "shakespeare_char"
batch_size = 12
block_size = 256  # 4x the CPU recipe's (at 2000 iterations val 1.574 vs 1.714 at block 64, on the val rows of before eval_windows)

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
