"""A small forward and backward on CUDA, every layout and op, for compute-sanitizer:

    compute-sanitizer --tool memcheck python tests/cuda_sanitizer_case.py
    compute-sanitizer --tool racecheck python tests/cuda_sanitizer_case.py
"""
import torch

import bnext


def main():
    for memory_format in (torch.contiguous_format, torch.channels_last):
        for dtype in (torch.float32, torch.bfloat16):
            module = bnext.BatchNorm2d(5, momentum=None).cuda()
            x = torch.randn(3, 5, 7, 9, device="cuda", dtype=dtype).contiguous(memory_format=memory_format)
            x.requires_grad_()
            module(x).float().square().sum().backward()
            module.eval()
            module(x.detach())
    y = bnext.batch_norm(torch.randn(33, 70, device="cuda"), None, None, training=True)
    torch.cuda.synchronize()
    print("sanitizer case done:", tuple(y.shape))


if __name__ == "__main__":
    main()
