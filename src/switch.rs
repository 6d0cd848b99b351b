//! A setting written `true`, `false` or `"auto"` in config.toml (and `--set`): `train.overlap`,
//! `train.channels_last`, `evaluate.channels_last`. Its own module so that the config schema and
//! the modules that interpret such settings share the type without importing one another.
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A setting written `true`, `false` or `"auto"` (sac decides): `train.overlap`,
/// `train.channels_last`, `evaluate.channels_last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Switch {
    On,
    Off,
    #[default]
    Auto,
}

impl Switch {
    /// Not `false` (for `overlap`: buckets may start during backward).
    pub fn hooks(self) -> bool {
        self != Switch::Off
    }
}

impl Serialize for Switch {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Switch::On => s.serialize_bool(true),
            Switch::Off => s.serialize_bool(false),
            Switch::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Switch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Str(String),
        }
        let msg = "expected true, false or \"auto\"";
        match Raw::deserialize(d).map_err(|_| serde::de::Error::custom(msg))? {
            Raw::Bool(true) => Ok(Switch::On),
            Raw::Bool(false) => Ok(Switch::Off),
            Raw::Str(s) if s.trim().eq_ignore_ascii_case("auto") => Ok(Switch::Auto),
            Raw::Str(s) => Err(serde::de::Error::custom(format!("`{s}`: {msg}"))),
        }
    }
}
