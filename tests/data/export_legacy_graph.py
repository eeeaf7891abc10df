"""Exports a small network in Paddle's legacy program format (run with FLAGS_enable_pir_api=0)."""

import sys
import numpy as np
import paddle
from paddle.static import InputSpec


class Net(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 4, 3, padding=1)

    def forward(self, x):
        return paddle.nn.functional.relu(self.conv(x)).mean(axis=[2, 3])


paddle.seed(0)
net = Net()
net.eval()
x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
np.save(sys.argv[1] + "/expected.npy", net(paddle.to_tensor(x)).numpy())
np.save(sys.argv[1] + "/x.npy", x)
paddle.jit.save(net, sys.argv[1] + "/inference", input_spec=[InputSpec([None, 3, None, None], "float32", "x")])
