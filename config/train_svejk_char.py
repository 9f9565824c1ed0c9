# The GPU recipe of config/train_shakespeare_char.py on a Czech corpus (svejk_char):
# a 6-layer, 6-head, 384-wide byte-level GPT; UTF-8 Czech takes about 1.12 bytes per character.
#   python train.py config/train_svejk_char.py

out_dir = "out-svejk-char"
eval_interval = 250  # evaluate often: this small model overfits
eval_iters = 200
log_interval = 10  # also how often last.pt is written

always_save_checkpoint = False  # ckpt.pt only when val improves

dataset = "svejk_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # context of up to 256 bytes

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # a baby model can take a large learning rate
max_iters = 5000
lr_decay_iters = 5000  # usually equal to max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a little larger than usual: few tokens per iteration

warmup_iters = 100
