"""
What the vendors' data sheets say a GPU can do at most, for bench.py's ratios: dense FLOP/s
(the MFU of a training step) and memory bandwidth (the fraction a decode step uses). None for
CPUs and for GPUs not listed.

    python -c "from device_peaks import peak_flops; print(peak_flops('cpu', 'float32'))"
"""
import re

import torch

# dense peak FLOP/s from the vendors' data sheets: (bfloat16/float16 tensor cores, TF32), the
# first name found in torch.cuda.get_device_name() (find), so a name that holds another comes
# before it (H200 NVL before H200, H100 PCIe before H100); float32 runs use TF32 (train.py and
# bench.py turn it on)
PEAK_FLOPS = [("GH200", 989e12, 495e12), ("H200 NVL", 835e12, 418e12), ("H200", 989e12, 495e12),
              ("H100 PCIe", 756e12, 378e12),
              ("H100 NVL", 835e12, 418e12), ("H100", 989e12, 495e12), ("A100", 312e12, 156e12),
              ("L40S", 362e12, 183e12), ("L40", 181e12, 90.5e12), ("L4", 121e12, 60e12),
              ("A10", 125e12, 62.5e12), ("V100", 125e12, 15.7e12)]


def peak_flops(device, dtype):
    """The device's dense peak FLOP/s for dtype, or None where unknown (CPUs, other GPUs)."""
    if not device.startswith("cuda"):
        return None
    row = find(torch.cuda.get_device_name(device), PEAK_FLOPS)
    return None if row is None else row[2] if dtype == "float32" else row[1]


def find(name, table):
    """The first row of table whose name stands in the GPU's name as a word of its own ("A100"
    in "NVIDIA A100-SXM4-40GB", not in "RTX A1000"), or None. A laptop part (its name says
    Laptop) is none of the desktop or data-centre parts listed: its clocks and memory differ."""
    if "laptop" in name.lower():
        return None
    return next((row for row in table if re.search(rf"(?<!\w){re.escape(row[0])}(?!\w)", name)), None)


# peak memory bandwidth (bytes/s) from the vendors' data sheets, the first name found in
# torch.cuda.get_device_name(): the ceiling of a decode step, which reads every weight and
# the whole KV cache once per step. None: sold with two memories (GH200: HBM3 or HBM3e)
PEAK_BANDWIDTH = [("GH200", None), ("H200 NVL", 4.8e12), ("H200", 4.8e12), ("H100 PCIe", 2.0e12),
                  ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.04e12), ("A100 80GB PCIe", 1.94e12),
                  ("A100", 1.56e12), ("L40S", 0.864e12), ("L40", 0.864e12), ("L4", 0.3e12), ("A10", 0.6e12),
                  ("V100", 0.9e12), ("RTX 4090", 1.01e12), ("RTX 3090", 0.936e12)]


def peak_bandwidth(device):
    """The device's peak memory bandwidth in bytes/s, or None where unknown (CPUs, other GPUs)."""
    if not device.startswith("cuda"):
        return None
    row = find(torch.cuda.get_device_name(device), PEAK_BANDWIDTH)
    return None if row is None else row[1]
