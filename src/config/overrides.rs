//! The overrides of the file: `--set section.key=value` (merged as TOML) and the dedicated flags.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::schema::Config;
use super::values::Sample;
use crate::models::Arch;

/// Overrides from dedicated flags; `None` leaves the config's value.
#[derive(Debug, Default, Clone)]
pub struct FlagOverrides {
    pub sample: Option<Sample>,
    pub seed: Option<u64>,
    pub source: Option<PathBuf>,
    pub model: Option<Arch>,
    pub epochs: Option<u32>,
    pub checkpoint: Option<PathBuf>,
    pub timeline: Option<PathBuf>,
    /// `evaluate --ema`.
    pub ema: bool,
}

impl FlagOverrides {
    pub(super) fn apply(&self, c: &mut Config) {
        if let Some(s) = self.sample {
            c.dataset.sample = s;
        }
        if let Some(s) = self.seed {
            c.dataset.seed = s;
        }
        if let Some(s) = &self.source {
            // A flag path is relative to the working directory, not to the config file.
            c.dataset.source = std::path::absolute(s).unwrap_or_else(|_| s.clone());
        }
        if let Some(m) = self.model {
            c.model.name = m;
        }
        if let Some(e) = self.epochs {
            c.train.epochs = e;
        }
        if let Some(p) = &self.checkpoint {
            c.evaluate.checkpoint = std::path::absolute(p).unwrap_or_else(|_| p.clone());
        }
        if let Some(p) = &self.timeline {
            c.timeline.file = std::path::absolute(p).unwrap_or_else(|_| p.clone());
        }
        if self.ema {
            c.evaluate.ema = true;
        }
    }
}

/// Keys whose default is "unset" (an `Option`), so the encoded defaults do not list them.
const UNSET_BY_DEFAULT: [(&str, &str); 1] = [("train", "norm_weight_decay")];

/// Parses the file text, then merges each `section.key=value` of `sets` into it.
pub(super) fn parse_with_sets(text: &str, sets: &[String]) -> Result<Config> {
    // First the file alone, so its errors carry line and column.
    let config: Config = toml::from_str(text)?;
    if sets.is_empty() {
        return Ok(config);
    }
    let mut table = toml::Table::try_from(&config).context("re-encoding the config")?;
    let known = toml::Table::try_from(Config::default()).context("encoding the defaults")?;
    for set in sets {
        let (key, value) = parse_set(set)?;
        let (section, field) = key
            .split_once('.')
            .filter(|(s, f)| !s.is_empty() && !f.is_empty())
            .with_context(|| format!("--set {set}: the key must be section.key, e.g. train.lr"))?;
        let Some(toml::Value::Table(known_section)) = known.get(section) else {
            let sections: Vec<_> = known.keys().map(String::as_str).collect();
            bail!("--set {set}: unknown section `{section}`; sections are {}", sections.join(", "));
        };
        if !known_section.contains_key(field) && !UNSET_BY_DEFAULT.contains(&(section, field)) {
            let mut keys: Vec<_> = known_section.keys().map(String::as_str).collect();
            keys.extend(UNSET_BY_DEFAULT.iter().filter(|(s, _)| *s == section).map(|(_, f)| *f));
            keys.sort_unstable();
            bail!("--set {set}: unknown key `{field}` in [{section}]; keys are {}", keys.join(", "));
        }
        let Some(toml::Value::Table(sec)) = table.get_mut(section) else { unreachable!("all sections encode") };
        sec.insert(field.to_string(), value);
        Config::deserialize(toml::Value::Table(table.clone()))
            .map_err(|e| anyhow::anyhow!("--set {set}: invalid value for {key}: {}", e.message().trim()))?;
    }
    Ok(Config::deserialize(toml::Value::Table(table))?)
}

/// `key=value` with `value` read as TOML, or as a string when it is a bare word.
fn parse_set(set: &str) -> Result<(String, toml::Value)> {
    let (key, raw) = set.split_once('=').with_context(|| format!("--set {set}: expected section.key=value"))?;
    let key = key.trim().to_string();
    let raw = raw.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    Ok((key, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Arch;

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = parse_with_sets("[train]\nepochs = 2\nlearning_rate = 0.1\n", &[]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("learning_rate"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn wrong_type_is_named() {
        let msg = format!("{:#}", parse_with_sets("[train]\nepochs = \"many\"\n", &[]).unwrap_err());
        assert!(msg.contains("epochs") || msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn set_overrides_any_key_and_reads_toml_values() {
        let sets = vec!["train.lr=0.01".into(), "model.name=vgg".into(), "image.mean=[0.5,0.5,0.5]".into()];
        let c = parse_with_sets("", &sets).unwrap();
        assert_eq!(c.train.lr, 0.01);
        assert_eq!(c.model.name, Arch::Vgg11Bn);
        assert_eq!(c.image.mean, [0.5; 3]);
    }

    #[test]
    fn set_with_unknown_key_lists_the_valid_ones() {
        let msg = format!("{:#}", parse_with_sets("", &["train.epoch=3".into()]).unwrap_err());
        assert!(msg.contains("unknown key `epoch`") && msg.contains("epochs"), "{msg}");
        let msg = format!("{:#}", parse_with_sets("", &["trian.epochs=3".into()]).unwrap_err());
        assert!(msg.contains("unknown section `trian`"), "{msg}");
    }

    #[test]
    fn set_with_bad_value_names_the_key() {
        let msg = format!("{:#}", parse_with_sets("", &["model.name=resnet99".into()]).unwrap_err());
        assert!(msg.contains("model.name") && msg.contains("resnet18"), "{msg}");
    }
}
