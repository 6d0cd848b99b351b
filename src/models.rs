//! The eight architectures (the original script's seven and resnet50, the model GPU benchmarks
//! quote) behind one enum and one `build` function. Variables are named as in
//! torchvision's `state_dict()`, so weights interchange with PyTorch (see `checkpoint`).
//!
//! resnet18/34/50, squeezenet1_0 and inception_v3 come from tch's vision module, which follows
//! torchvision. alexnet, vgg11_bn and densenet121 are built here: tch's vgg and densenet end in
//! fixed-size layers (a 512*7*7 linear layer straight after the features, a 7x7 average pool) that
//! only fit 224x224 inputs where torchvision pools adaptively, and tch's alexnet gives its second
//! convolution padding 1 and stride 2 where torchvision has padding 2 and stride 1 (the weights have
//! the same shapes, so only the logits would tell). Beware of tch's `avg_pool2d_default`, which
//! passes a divisor override of 1 and so sums instead of averaging. tests/torchvision_interop.rs holds all eight to
//! torchvision's logits.
use std::collections::BTreeMap;
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
    /// torchvision resnet50 (bottleneck blocks, stride in the 3x3 convolution: torchvision's v1.5)
    Resnet50,
    /// torchvision alexnet
    Alexnet,
    /// torchvision vgg11_bn; "vgg" in configs, on the command line and in checkpoints (the
    /// original script's name)
    #[serde(rename = "vgg")]
    #[value(name = "vgg")]
    Vgg11Bn,
    /// torchvision squeezenet1_0
    Squeezenet,
    /// torchvision densenet121
    Densenet,
    /// torchvision inception_v3 (aux_logits=False); needs at least 75x75 input
    Inception,
}

impl Arch {
    pub const ALL: [Arch; 8] = [
        Arch::Resnet18,
        Arch::Resnet34,
        Arch::Resnet50,
        Arch::Alexnet,
        Arch::Vgg11Bn,
        Arch::Squeezenet,
        Arch::Densenet,
        Arch::Inception,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Resnet18 => "resnet18",
            Arch::Resnet34 => "resnet34",
            Arch::Resnet50 => "resnet50",
            Arch::Alexnet => "alexnet",
            Arch::Vgg11Bn => "vgg",
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
        Arch::Resnet18 | Arch::Resnet34 | Arch::Resnet50 => (8, 8),
        Arch::Squeezenet => (21, 21),
        Arch::Densenet => (29, 29),
        Arch::Vgg11Bn => (32, 32),
        Arch::Alexnet => (63, 63),
        Arch::Inception => (75, 75),
    }
}

/// Prefix of the classifier head's variables (trained alone with `feature_extract`, re-initialized
/// when a pretrained file has another class count).
pub fn head_prefix(arch: Arch) -> &'static str {
    match arch {
        Arch::Resnet18 | Arch::Resnet34 | Arch::Resnet50 | Arch::Inception => "fc.",
        Arch::Alexnet | Arch::Vgg11Bn => "classifier.6.",
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
        Arch::Resnet50 => Box::new(vision::resnet::resnet50(p, classes)),
        Arch::Alexnet => Box::new(alexnet(p, classes)),
        Arch::Vgg11Bn => Box::new(vgg11_bn(p, classes)),
        Arch::Squeezenet => Box::new(vision::squeezenet::v1_0(p, classes)),
        Arch::Densenet => Box::new(densenet121(p, classes)),
        Arch::Inception => Box::new(vision::inception::v3(p, classes)),
    }
}

/// How one tensor starts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    Const(f64),
    /// U(-bound, bound).
    Uniform(f64),
    /// N(0, std²), cut at ±`cut` (torchvision's `trunc_normal_` bounds; infinite for none).
    Normal {
        std: f64,
        cut: f64,
    },
}

/// The kind of layer a variable belongs to, told from its name and shape (as torchvision's
/// constructors tell it from the module type): convolution and linear weights are 4-D and 2-D,
/// batch-norm weights 1-D; a bias is a batch-norm bias when the layer has running statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    ConvWeight {
        fan_in: f64,
        fan_out: f64,
    },
    ConvBias {
        fan_in: f64,
    },
    LinearWeight {
        fan_in: f64,
    },
    LinearBias {
        fan_in: f64,
    },
    NormWeight,
    NormBias,
    /// Running statistics and counters: tch starts them as torch does (0 and 1).
    Buffer,
}

fn role(name: &str, vars: &BTreeMap<String, Tensor>) -> Role {
    let (layer, leaf) = name.rsplit_once('.').unwrap_or(("", name));
    let weight_shape = vars.get(&format!("{layer}.weight")).map(Tensor::size).unwrap_or_default();
    let fans = |w: &[i64]| {
        let field: i64 = w.iter().skip(2).product();
        ((w.get(1).copied().unwrap_or(1) * field) as f64, (w.first().copied().unwrap_or(1) * field) as f64)
    };
    let (fan_in, fan_out) = fans(&weight_shape);
    match (leaf, weight_shape.len()) {
        ("weight", 4) => Role::ConvWeight { fan_in, fan_out },
        ("bias", 4) => Role::ConvBias { fan_in },
        ("weight", 2) => Role::LinearWeight { fan_in },
        ("bias", 2) => Role::LinearBias { fan_in },
        ("weight", 1) => Role::NormWeight,
        ("bias", 1) => Role::NormBias,
        _ => Role::Buffer,
    }
}

/// torch's own `reset_parameters` of Conv2d and Linear: weight and bias U(±1/√fan_in) (the
/// weight's `kaiming_uniform_(a=√5)` comes to that bound).
fn torch_default(role: Role) -> Option<Init> {
    match role {
        Role::ConvWeight { fan_in, .. }
        | Role::ConvBias { fan_in }
        | Role::LinearWeight { fan_in }
        | Role::LinearBias { fan_in } => Some(Init::Uniform(1.0 / fan_in.sqrt())),
        Role::NormWeight => Some(Init::Const(1.0)),
        Role::NormBias => Some(Init::Const(0.0)),
        Role::Buffer => None,
    }
}

/// How torchvision's constructor (0.26 to 0.28) initialises the variable `name` of `arch` (None: left as
/// built, for buffers). Rules from torchvision's models: resnet.py, vgg.py, squeezenet.py,
/// densenet.py and inception.py set them in a loop over the modules after building; alexnet.py
/// keeps torch's defaults.
fn torchvision_init(arch: Arch, name: &str, role: Role) -> Option<Init> {
    let kaiming_normal = |fan: f64| Init::Normal { std: (2.0 / fan).sqrt(), cut: f64::INFINITY };
    let no_cut = |std: f64| Init::Normal { std, cut: f64::INFINITY };
    match (arch, role) {
        (_, Role::Buffer) => None,
        (Arch::Alexnet, r) => torch_default(r),
        // kaiming_normal_(mode="fan_out", nonlinearity="relu"); batch norm 1 and 0; fc as torch.
        (Arch::Resnet18 | Arch::Resnet34 | Arch::Resnet50, Role::ConvWeight { fan_out, .. }) => {
            Some(kaiming_normal(fan_out))
        }
        // The same for the convolutions (with bias 0); linear layers N(0, 0.01) with bias 0.
        (Arch::Vgg11Bn, Role::ConvWeight { fan_out, .. }) => Some(kaiming_normal(fan_out)),
        (Arch::Vgg11Bn, Role::ConvBias { .. } | Role::LinearBias { .. }) => Some(Init::Const(0.0)),
        (Arch::Vgg11Bn, Role::LinearWeight { .. }) => Some(no_cut(0.01)),
        // The final convolution N(0, 0.01), the others kaiming_uniform_ (U(±√(6/fan_in))); biases 0.
        (Arch::Squeezenet, Role::ConvWeight { .. }) if name == "classifier.1.weight" => Some(no_cut(0.01)),
        (Arch::Squeezenet, Role::ConvWeight { fan_in, .. }) => Some(Init::Uniform((6.0 / fan_in).sqrt())),
        (Arch::Squeezenet, Role::ConvBias { .. }) => Some(Init::Const(0.0)),
        // kaiming_normal_ (fan_in); the classifier's weight as torch, its bias 0.
        (Arch::Densenet, Role::ConvWeight { fan_in, .. }) => Some(kaiming_normal(fan_in)),
        (Arch::Densenet, Role::LinearBias { .. }) => Some(Init::Const(0.0)),
        // trunc_normal_(std=0.1, a=-2, b=2) for every convolution and the fc weight (the aux
        // head's other stddevs do not apply without aux_logits); the fc bias as torch.
        (Arch::Inception, Role::ConvWeight { .. } | Role::LinearWeight { .. }) => {
            Some(Init::Normal { std: 0.1, cut: 2.0 })
        }
        (_, r) => torch_default(r),
    }
}

/// Initialises every variable of a freshly built `arch` as torchvision's constructor does (tch's
/// layers start otherwise: batch-norm weights U(0, 1) instead of 1, convolutions
/// kaiming-uniform fan-in for every architecture). Draws from torch's generator, so
/// `tch::manual_seed` makes it repeatable. Variables are visited in name order.
pub fn init_as_torchvision(arch: Arch, vars: &BTreeMap<String, Tensor>) {
    tch::no_grad(|| {
        for (name, t) in vars {
            let Some(init) = torchvision_init(arch, name, role(name, vars)) else { continue };
            let mut t = t.shallow_clone();
            match init {
                Init::Const(c) => {
                    let _ = t.fill_(c);
                }
                Init::Uniform(b) => {
                    let _ = t.uniform_(-b, b);
                }
                Init::Normal { std, cut } => {
                    let _ = t.normal_(0.0, std);
                    if cut.is_finite() {
                        let _ = t.clamp_(-cut, cut);
                    }
                }
            }
        }
    });
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
        .add_fn(move |x| pool(&x.relu()).adaptive_avg_pool2d([6, 6]).flatten(1, -1))
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
    seq.add_fn(|x| x.adaptive_avg_pool2d([7, 7]).flatten(1, -1))
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
        .add_fn(|x| x.relu().adaptive_avg_pool2d([1, 1]).flatten(1, -1))
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

    /// Channels-last batches (`channels_last`) go through every architecture, forward and
    /// backward, at its minimum input size and at 64 px, and give the logits of contiguous ones:
    /// the classifier flattens as torchvision does (`torch.flatten`), not with a view that needs
    /// contiguous features.
    #[test]
    fn every_architecture_takes_channels_last_batches_with_the_same_logits() {
        tch::set_num_threads(1);
        tch::manual_seed(3);
        for arch in Arch::ALL {
            let vs = nn::VarStore::new(Device::Cpu);
            let net = build(&vs.root(), arch, 5);
            let (w, h) = min_input_size(arch);
            for side in [w.max(h) as i64, 64.max(w.max(h) as i64)] {
                let x = Tensor::randn([2, 3, side, side], (Kind::Float, Device::Cpu));
                let nhwc = crate::precision::to_channels_last(&x).unwrap();
                let (a, b) = (net.forward_t(&x, false), net.forward_t(&nhwc, false));
                let diff = (&a - &b).abs().max().double_value(&[]);
                assert!(diff <= 1e-4 * a.abs().max().double_value(&[]).max(1.0), "{arch} at {side} px: {diff}");
                net.forward_t(&nhwc, true).sum(Kind::Float).backward();
            }
        }
    }
}
