"""dsv3.ep.config: Config validation, size hints and the per-R default tables."""

import pytest

from dsv3.ep import config as ep_config
from dsv3.ep.config import Config, get_combine_config, get_dispatch_config, nvl_buffer_layout, set_num_sms

RANKS = [2, 4, 8, 16, 24, 32, 64, 128, 144, 160]


def test_defaults_and_positional_order():
    c = Config()
    assert (c.num_sms, c.num_channels) == (20, 10)
    assert c.num_max_nvl_chunked_send_tokens == 6 and c.num_max_nvl_chunked_recv_tokens == 256
    assert c.num_max_rdma_chunked_send_tokens == 6
    assert c.num_max_rdma_chunked_recv_tokens == 258  # 256 aligned up to a multiple of 6
    c = Config(24, 8, 512, 16, 128)
    assert (c.num_sms, c.num_channels, c.num_max_nvl_chunked_send_tokens) == (24, 12, 8)
    assert (c.num_max_nvl_chunked_recv_tokens, c.num_max_rdma_chunked_send_tokens) == (512, 16)
    assert c.num_max_rdma_chunked_recv_tokens == 128
    assert c == Config(24, 8, 512, 16, 128) and hash(c) == hash(Config(24, 8, 512, 16, 128))
    assert c != Config(24, 8, 512, 16, 144)
    assert "num_sms=24" in repr(c)


@pytest.mark.parametrize(
    "args, name",
    [
        ((3,), "num_sms"),
        ((0,), "num_sms"),
        ((20, 256, 256), "num_max_nvl_chunked_send_tokens"),
        ((20, 300, 256), "num_max_nvl_chunked_send_tokens"),
        ((20, 0), "num_max_nvl_chunked_send_tokens"),
        ((20, 6, 256, 0), "num_max_rdma_chunked_send_tokens"),
        ((20, 6, 256, 128, 128), "num_max_rdma_chunked_send_tokens"),
        ((20, 6, 256, 6, 1), "num_max_rdma_chunked_recv_tokens"),
    ],
)
def test_invalid_values_name_the_argument(args, name):
    with pytest.raises(ValueError, match=name):
        Config(*args)


def test_invalid_types():
    with pytest.raises(TypeError, match="num_sms"):
        Config(20.0)
    with pytest.raises(TypeError, match="num_max_nvl_chunked_recv_tokens"):
        Config(20, 6, "256")
    with pytest.raises(TypeError, match="num_sms"):
        Config(True)


def test_rdma_recv_alignment_and_double_buffering():
    assert Config(20, 6, 256, 20, 128).num_max_rdma_chunked_recv_tokens == 140
    assert Config(20, 6, 256, 64, 128).num_max_rdma_chunked_recv_tokens == 128
    assert Config(20, 6, 256, 65, 128).num_max_rdma_chunked_recv_tokens == 130  # 65 <= 130 / 2
    with pytest.raises(ValueError, match="num_max_rdma_chunked_send_tokens"):
        Config(20, 6, 256, 200, 128)  # the queue would hold a single send chunk


def test_nvl_hint_is_the_layout_total_at_the_bounds():
    for c in [Config(), Config(24, 8, 256), Config(2, 1, 2)]:
        for r in [1, 2, 4, 8]:
            for hidden_bytes in [256, 7168, 14336]:
                want = nvl_buffer_layout(
                    r, 1024, hidden_bytes, 128, 32, c.num_channels, c.num_max_nvl_chunked_recv_tokens
                )["total"][1]
                assert c.get_nvl_buffer_size_hint(hidden_bytes, r) == want
                assert want % 128 == 0
        # beyond one node the NVLink domain stays 8 ranks wide
        assert c.get_nvl_buffer_size_hint(7168, 32) == c.get_nvl_buffer_size_hint(7168, 8)


def test_nvl_hint_scale_and_monotonicity():
    c = Config()
    h = c.get_nvl_buffer_size_hint(14336, 8)
    # the x queues dominate: 10 channels x 8 sources x 256 slots x 14336 bytes
    assert 10 * 8 * 256 * 14336 < h < 10 * 8 * 256 * (14336 + 4 + 32 * 12 + 128 * 4) + 64 * 1024
    assert c.get_nvl_buffer_size_hint(7168, 8) < h
    assert c.get_nvl_buffer_size_hint(14336, 4) < h
    assert Config(40).get_nvl_buffer_size_hint(14336, 8) > h
    with pytest.raises(ValueError, match="num_ranks"):
        c.get_nvl_buffer_size_hint(7168, 12)
    with pytest.raises(ValueError, match="hidden_bytes"):
        c.get_nvl_buffer_size_hint(0, 8)


def test_rdma_hint():
    for r in [1, 2, 4, 8]:
        assert Config().get_rdma_buffer_size_hint(14336, r) == 0
    # the nvshmem backend's internode layout total (its NVLink queues included, so larger than DeepEP's
    # 91,887,744 for this config; tests/ep/test_internode_layout.py checks it against the C++ layout)
    assert Config(20, 36, 288, 20, 128).get_rdma_buffer_size_hint(14336, 16) == 433_378_816
    c = Config()
    assert c.get_rdma_buffer_size_hint(14336, 32) > c.get_rdma_buffer_size_hint(14336, 16) > 0
    assert c.get_rdma_buffer_size_hint(14336, 16) % 128 == 0
    with pytest.raises(ValueError, match="num_ranks"):
        c.get_rdma_buffer_size_hint(14336, 20)


def test_tables_and_set_num_sms():
    try:
        for r in RANKS:
            d, c = get_dispatch_config(r), get_combine_config(r)
            assert d.num_sms == c.num_sms == 20
            assert d.num_max_nvl_chunked_send_tokens < d.num_max_nvl_chunked_recv_tokens
        assert get_dispatch_config(8) == Config(20, 6, 256, 6, 128)
        assert get_combine_config(8) == Config(20, 4, 256, 6, 128)
        set_num_sms(24)
        assert ep_config.get_num_sms() == 24
        assert get_dispatch_config(16).num_sms == 24 and get_combine_config(2).num_channels == 12
        with pytest.raises(ValueError, match="num_sms"):
            set_num_sms(23)
        with pytest.raises(TypeError, match="num_sms"):
            set_num_sms(None)
        for bad in [1, 3, 12, 256, 0]:
            with pytest.raises(ValueError, match="num_ranks"):
                get_dispatch_config(bad)
            with pytest.raises(ValueError, match="num_ranks"):
                get_combine_config(bad)
    finally:
        set_num_sms(20)
