//! The seven architectures behind one enum and one `build` function. Variables are named as in
//! torchvision's `state_dict()`, so weights interchange with PyTorch (see `checkpoint`).
//!
//! resnet18/34, squeezenet1_0 and inception_v3 come from tch's vision module, which follows
//! torchvision. alexnet, vgg11_bn and densenet121 are built here: tch's vgg and densenet end in
//! fixed-size layers (a 512*7*7 linear layer straight after the features, a 7x7 average pool) that
//! only fit 224x224 inputs where torchvision pools adaptively, and tch's alexnet gives its second
//! convolution padding 1 and stride 2 where torchvision has padding 2 and stride 1 (the weights have
//! the same shapes, so only the logits would tell). Beware of tch's `avg_pool2d_default`, which
//! passes a divisor override of 1 and so sums instead of averaging. tests/torchvision_interop.rs holds all seven to
//! torchvision's logits.
use std::fmt;
use tch::nn::{self, ModuleT};

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// The architectures, named as in the original script; each maps to one torchvision model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// torchvision resnet18
    Resnet18,
    /// torchvision resnet34
    Resnet34,
    /// torchvision alexnet
    Alexnet,
    /// torchvision vgg11_bn
    Vgg,
    /// torchvision squeezenet1_0
    Squeezenet,
    /// torchvision densenet121
    Densenet,
    /// torchvision inception_v3 (aux_logits=False); needs at least 75x75 input
    Inception,
}

impl Arch {
    pub const ALL: [Arch; 7] =
        [Arch::Resnet18, Arch::Resnet34, Arch::Alexnet, Arch::Vgg, Arch::Squeezenet, Arch::Densenet, Arch::Inception];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Resnet18 => "resnet18",
            Arch::Resnet34 => "resnet34",
            Arch::Alexnet => "alexnet",
            Arch::Vgg => "vgg",
            Arch::Squeezenet => "squeezenet",
            Arch::Densenet => "densenet",
            Arch::Inception => "inception",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The smallest input each architecture accepts (width, height), from its strides and kernels
/// (found by trying torchvision's models, size by size). ResNets take any size down to the
/// config's floor of 8.
pub fn min_input_size(arch: Arch) -> (u32, u32) {
    match arch {
        Arch::Resnet18 | Arch::Resnet34 => (8, 8),
        Arch::Squeezenet => (21, 21),
        Arch::Densenet => (29, 29),
        Arch::Vgg => (32, 32),
        Arch::Alexnet => (63, 63),
        Arch::Inception => (75, 75),
    }
}

/// Prefix of the classifier head's variables (trained alone with `feature_extract`, re-initialized
/// when a pretrained file has another class count).
pub fn head_prefix(arch: Arch) -> &'static str {
    match arch {
        Arch::Resnet18 | Arch::Resnet34 | Arch::Inception => "fc.",
        Arch::Alexnet | Arch::Vgg => "classifier.6.",
        Arch::Squeezenet => "classifier.1.",
        Arch::Densenet => "classifier.",
    }
}

/// A model on the variables under `p`, with `classes` outputs.
pub fn build(p: &nn::Path, arch: Arch, classes: i64) -> Box<dyn ModuleT> {
    use tch::vision;
    match arch {
        Arch::Resnet18 => Box::new(vision::resnet::resnet18(p, classes)),
        Arch::Resnet34 => Box::new(vision::resnet::resnet34(p, classes)),
        Arch::Alexnet => Box::new(alexnet(p, classes)),
        Arch::Vgg => Box::new(vgg11_bn(p, classes)),
        Arch::Squeezenet => Box::new(vision::squeezenet::v1_0(p, classes)),
        Arch::Densenet => Box::new(densenet121(p, classes)),
        Arch::Inception => Box::new(vision::inception::v3(p, classes)),
    }
}

fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64, padding: i64, stride: i64, bias: bool) -> nn::Conv2D {
    nn::conv2d(p, c_in, c_out, k, nn::ConvConfig { stride, padding, bias, ..Default::default() })
}

/// torchvision `alexnet`: five convolutions with max pools, adaptive average pool to 6x6,
/// classifier 9216-4096-4096-classes with dropout before the first two linear layers.
fn alexnet(p: &nn::Path, classes: i64) -> nn::SequentialT {
    let f = p / "features";
    let c = p / "classifier";
    let pool = |x: &Tensor| x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false);
    nn::seq_t()
        .add(conv(&f / "0", 3, 64, 11, 2, 4, true))
        .add_fn(move |x| pool(&x.relu()))
        .add(conv(&f / "3", 64, 192, 5, 2, 1, true))
        .add_fn(move |x| pool(&x.relu()))
        .add(conv(&f / "6", 192, 384, 3, 1, 1, true))
        .add_fn(|x| x.relu())
        .add(conv(&f / "8", 384, 256, 3, 1, 1, true))
        .add_fn(|x| x.relu())
        .add(conv(&f / "10", 256, 256, 3, 1, 1, true))
        .add_fn(move |x| pool(&x.relu()).adaptive_avg_pool2d([6, 6]).flat_view())
        .add_fn_t(|x, train| x.dropout(0.5, train))
        .add(nn::linear(&c / "1", 256 * 6 * 6, 4096, Default::default()))
        .add_fn(|x| x.relu())
        .add_fn_t(|x, train| x.dropout(0.5, train))
        .add(nn::linear(&c / "4", 4096, 4096, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&c / "6", 4096, classes, Default::default()))
}

/// torchvision `vgg11_bn`: features (conv-bn-relu blocks and max pools), adaptive average pool
/// to 7x7, classifier 25088-4096-4096-classes with dropout.
fn vgg11_bn(p: &nn::Path, classes: i64) -> nn::SequentialT {
    const CFG: [&[i64]; 5] = [&[64], &[128], &[256, 256], &[512, 512], &[512, 512]];
    let f = p / "features";
    let c = p / "classifier";
    let mut seq = nn::seq_t();
    // torchvision numbers the layers of `features` in order: conv, bn, relu, ..., maxpool.
    let mut idx = 0;
    let mut c_in = 3;
    for block in CFG {
        for &c_out in block {
            seq = seq.add(conv(&f / idx.to_string(), c_in, c_out, 3, 1, 1, true));
            seq = seq.add(nn::batch_norm2d(&f / (idx + 1).to_string(), c_out, Default::default()));
            seq = seq.add_fn(|x| x.relu());
            idx += 3;
            c_in = c_out;
        }
        seq = seq.add_fn(|x| x.max_pool2d_default(2));
        idx += 1;
    }
    seq.add_fn(|x| x.adaptive_avg_pool2d([7, 7]).flat_view())
        .add(nn::linear(&c / "0", 512 * 7 * 7, 4096, Default::default()))
        .add_fn(|x| x.relu())
        .add_fn_t(|x, train| x.dropout(0.5, train))
        .add(nn::linear(&c / "3", 4096, 4096, Default::default()))
        .add_fn(|x| x.relu())
        .add_fn_t(|x, train| x.dropout(0.5, train))
        .add(nn::linear(&c / "6", 4096, classes, Default::default()))
}

/// One torchvision `_DenseLayer`: bn-relu-conv1x1 (bottleneck) then bn-relu-conv3x3, concatenated.
fn dense_layer(p: nn::Path, c_in: i64, bn_size: i64, growth: i64) -> nn::FuncT<'static> {
    let c_mid = bn_size * growth;
    let norm1 = nn::batch_norm2d(&p / "norm1", c_in, Default::default());
    let conv1 = conv(&p / "conv1", c_in, c_mid, 1, 0, 1, false);
    let norm2 = nn::batch_norm2d(&p / "norm2", c_mid, Default::default());
    let conv2 = conv(&p / "conv2", c_mid, growth, 3, 1, 1, false);
    nn::func_t(move |x, train| {
        let y = x.apply_t(&norm1, train).relu().apply(&conv1).apply_t(&norm2, train).relu().apply(&conv2);
        Tensor::cat(&[x, &y], 1)
    })
}

/// torchvision `densenet121`: growth 32, blocks (6, 12, 24, 16), 64 initial features, bn_size 4.
fn densenet121(p: &nn::Path, classes: i64) -> nn::SequentialT {
    const BLOCKS: [i64; 4] = [6, 12, 24, 16];
    let (growth, bn_size, mut c) = (32, 4, 64);
    let f = p / "features";
    let mut seq = nn::seq_t()
        .add(conv(&f / "conv0", 3, c, 7, 3, 2, false))
        .add(nn::batch_norm2d(&f / "norm0", c, Default::default()))
        .add_fn(|x| x.relu().max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false));
    for (i, &layers) in BLOCKS.iter().enumerate() {
        let block = &f / format!("denseblock{}", i + 1);
        for l in 0..layers {
            seq = seq.add(dense_layer(&block / format!("denselayer{}", l + 1), c + l * growth, bn_size, growth));
        }
        c += layers * growth;
        if i + 1 < BLOCKS.len() {
            let t = &f / format!("transition{}", i + 1);
            seq = seq
                .add(nn::batch_norm2d(&t / "norm", c, Default::default()))
                .add_fn(|x| x.relu())
                .add(conv(&t / "conv", c, c / 2, 1, 0, 1, false))
                .add_fn(|x| x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>));
            c /= 2;
        }
    }
    seq.add(nn::batch_norm2d(&f / "norm5", c, Default::default()))
        .add_fn(|x| x.relu().adaptive_avg_pool2d([1, 1]).flat_view())
        .add(nn::linear(p / "classifier", c, classes, Default::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Every architecture takes a batch at its minimum input size and gives one logit per class.
    #[test]
    fn every_architecture_runs_at_its_minimum_input_size() {
        tch::set_num_threads(1);
        for arch in Arch::ALL {
            let vs = nn::VarStore::new(Device::Cpu);
            let net = build(&vs.root(), arch, 5);
            let (w, h) = min_input_size(arch);
            let x = Tensor::randn([2, 3, h as i64, w as i64], (Kind::Float, Device::Cpu));
            let y = net.forward_t(&x, true);
            assert_eq!(y.size(), [2, 5], "{arch}");
            let names = vs.variables();
            let head = head_prefix(arch);
            assert!(names.keys().any(|k| k.starts_with(head)), "{arch}: no variable under {head}");
        }
    }
}
