import torch

from capsutil.bench.matrix import tensor_peak_bytes


def test_tensor_peak_counts_the_tensors_alive_at_once():
    def two_at_once():
        first = torch.ones(1_000_000)          # 4 MB
        second = torch.ones(1_000_000)         # 4 MB more while the first lives
        return float(first[0] + second[0])

    def one_at_a_time():
        for _ in range(2):
            float(torch.ones(1_000_000)[0])    # each freed before the next

    assert 8e6 <= tensor_peak_bytes(two_at_once) < 8.5e6
    assert 4e6 <= tensor_peak_bytes(one_at_a_time) < 4.5e6
