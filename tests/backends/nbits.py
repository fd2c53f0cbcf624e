"""Random MatMulNBits weights for the kernel tests: codes, scales and zero points packed as ORT
stores them, repacked as the TVM rules do, and the dense weight they stand for; and ORT's
``accuracy_level=4`` activation as a numpy reference."""

import numpy as np

from rotaq.backends.tvm_matmul import repack_nbits


def random_nbits(rng, k, n, bits, block):
    """(``repack_nbits`` output (codes, scale, shift), dense weight ``[K, N]``); K need not be
    a multiple of the block (the last block zero-padded). Draws codes, scales, zero points."""
    nb = -(-k // block)
    codes = rng.integers(0, 2**bits, (n, nb * block))
    codes[:, k:] = 0
    per = 8 // bits
    packed = np.zeros((n, nb * block // per), np.uint16)
    for i in range(per):
        packed |= codes[:, i::per].astype(np.uint16) << (i * bits)
    scales = rng.random((n, nb)).astype(np.float32) * 0.1
    zp = rng.integers(0, 2**bits, (n, nb))
    zpack = np.zeros((n, -(-nb // per)), np.uint16)
    zfull = np.zeros((n, -(-nb // per) * per), np.int64)
    zfull[:, :nb] = zp
    for i in range(per):
        zpack |= zfull[:, i::per].astype(np.uint16) << (i * bits)
    rep = repack_nbits(packed.astype(np.uint8).reshape(n, nb, -1), scales,
                       zpack.astype(np.uint8), k, n, bits, block)
    w = ((codes - np.repeat(zp, block, 1)) * np.repeat(scales, block, 1))[:, :k].T
    return rep, w


def act_int8(x, k, block):
    """ORT's accuracy_level=4 activation: per row and block, round(x / s) * s, s = amax / 127
    (0 for an all-zero block)."""
    m = len(x)
    nb = -(-k // block)
    xb = np.zeros((m, nb * block))
    xb[:, :k] = x
    xb = xb.reshape(m, nb, block)
    s = np.abs(xb).max(-1, keepdims=True) / 127
    return (np.round(xb / np.where(s > 0, s, 1)) * s).reshape(m, -1)[:, :k]
