//! What carries the messages: the MPI library's transport components, read through the MPI tool
//! interface (MPI_T), and the environment variables that choose them.
//!
//! Open MPI names its layers in its control variables: `pml_ob1_priority`, `btl_tcp_links`. After
//! `MPI_Init` it closes the components it did not select and takes their variables off the list,
//! so the point-to-point layer (pml) whose variables remain is the one in use (`ob1`, `ucx`, `cm`),
//! and so are ob1's byte-transfer layers (btl: `self`, `vader` within a node, `tcp`, `openib`…) or
//! cm's matching layer (mtl: `psm2`, `ofi`). MPICH's device (`ch4:ucx`, `ch4:ofi`) is in its
//! library version text already; UCX or libfabric then choose the wire from what the node has,
//! unless `UCX_TLS` or `FI_PROVIDER` say.
use super::world::Dist;
use std::collections::BTreeSet;
use std::ffi::{c_char, c_int};

/// The environment variables that choose a transport, shown when set.
const TRANSPORT_VARS: [&str; 9] = [
    "UCX_TLS",
    "UCX_NET_DEVICES",
    "FI_PROVIDER",
    "OMPI_MCA_pml",
    "OMPI_MCA_btl",
    "OMPI_MCA_mtl",
    "MPIR_CVAR_CH4_NETMOD",
    "MPIR_CVAR_CH4_OFI_PROVIDER",
    "I_MPI_FABRICS",
];

/// The components of framework `framework` (`pml`, `btl`) that have control variables of their own
/// in `names` (`pml_ob1_priority` → `ob1`; the framework's own `pml_base_*` and `pml` are not
/// components), sorted.
fn components<'a>(names: &'a [String], framework: &str) -> BTreeSet<&'a str> {
    names
        .iter()
        .filter_map(|n| n.strip_prefix(framework)?.strip_prefix('_'))
        .filter_map(|rest| rest.split('_').next())
        .filter(|c| !c.is_empty() && *c != "base")
        .collect()
}

/// Open MPI's transport from the names of its control variables after `MPI_Init`: `pml ob1 over
/// btl self, tcp, vader`, `pml ucx`, `pml cm over mtl psm2`. None when the names show no single
/// point-to-point layer (not Open MPI, or a library that keeps unselected components listed).
pub fn open_mpi_transport(names: &[String]) -> Option<String> {
    let pml = components(names, "pml");
    let [only] = pml.iter().collect::<Vec<_>>()[..] else { return None };
    let under = match *only {
        "ob1" => Some("btl"),
        "cm" => Some("mtl"),
        _ => None,
    };
    let mut text = format!("pml {only}");
    if let Some(framework) = under {
        let parts = components(names, framework);
        if !parts.is_empty() {
            text.push_str(&format!(" over {framework} {}", parts.into_iter().collect::<Vec<_>>().join(", ")));
        }
    }
    Some(text)
}

/// `UCX_TLS=tcp, FI_PROVIDER=verbs`: the transport variables of `TRANSPORT_VARS` that `get` has.
fn chosen_by_env(get: impl Fn(&str) -> Option<String>) -> Vec<String> {
    TRANSPORT_VARS.iter().filter_map(|v| get(v).map(|x| format!("{v}={x}"))).collect()
}

/// The names of the MPI library's control variables (MPI_T), or None where the tool interface
/// does not start. MPI_T has its own init and finalize, allowed at any time, also after MPI_Init.
fn control_variable_names() -> Option<Vec<String>> {
    // SAFETY: MPI_T_init_thread/MPI_T_finalize bracket the calls; every out-pointer points at live
    // storage of the type mpi.h declares (zeroed: an integer or a null pointer, per library), and
    // the name buffer's length is passed with it, so the library writes within it.
    unsafe {
        let mut provided: c_int = 0;
        if mpi::ffi::MPI_T_init_thread(mpi::ffi::RSMPI_THREAD_SINGLE, &mut provided) != 0 {
            return None;
        }
        let mut count: c_int = 0;
        let mut names = Vec::new();
        if mpi::ffi::MPI_T_cvar_get_num(&mut count) == 0 {
            for i in 0..count {
                let mut name = [0 as c_char; 256];
                let mut name_len = name.len() as c_int;
                let mut desc_len: c_int = 0;
                let (mut verbosity, mut bind, mut scope): (c_int, c_int, c_int) = (0, 0, 0);
                let mut datatype: mpi::ffi::MPI_Datatype = std::mem::zeroed();
                let mut enumtype: mpi::ffi::MPI_T_enum = std::mem::zeroed();
                let rc = mpi::ffi::MPI_T_cvar_get_info(
                    i,
                    name.as_mut_ptr(),
                    &mut name_len,
                    &mut verbosity,
                    &mut datatype,
                    &mut enumtype,
                    std::ptr::null_mut(),
                    &mut desc_len,
                    &mut bind,
                    &mut scope,
                );
                if rc == 0 {
                    names.push(std::ffi::CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned());
                }
            }
        }
        mpi::ffi::MPI_T_finalize();
        Some(names)
    }
}

impl Dist {
    /// What carries the messages, as far as the library and the environment tell: Open MPI's
    /// selected layers (`pml ob1 over btl self, tcp, vader`), MPICH's device, and the variables
    /// that choose a transport (`UCX_TLS=tcp`). None: one process.
    pub fn transport(&self) -> Option<String> {
        let library = self.library()?;
        let mut parts = Vec::new();
        if library.starts_with("Open MPI") {
            let layers = control_variable_names().as_deref().and_then(open_mpi_transport);
            parts.push(layers.unwrap_or_else(|| "layers not reported".into()));
        } else if let Some(device) = library.split("Device: ").nth(1) {
            parts.push(format!("device {}", device.split(',').next().unwrap_or(device).trim()));
        }
        let env = chosen_by_env(|v| std::env::var(v).ok());
        parts.push(if env.is_empty() { "no transport variables set".into() } else { env.join(", ") });
        Some(parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ob1_is_named_with_its_byte_transfer_layers() {
        // What Open MPI 4.1 lists after MPI_Init under its default selection (abridged).
        let n = names(&[
            "btl",
            "btl_base_verbose",
            "btl_tcp_links",
            "btl_vader_fbox_max",
            "btl_self_eager_limit",
            "pml",
            "pml_base_verbose",
            "pml_ob1_priority",
            "pml_ob1_free_list_num",
            "mtl",
            "mtl_psm2_priority",
            "mpi_param_check",
        ]);
        assert_eq!(open_mpi_transport(&n).as_deref(), Some("pml ob1 over btl self, tcp, vader"));
    }

    #[test]
    fn ucx_and_cm_are_named_with_what_belongs_to_them() {
        let ucx = names(&["pml", "pml_base_verbose", "pml_ucx_tls", "btl_tcp_links", "mtl_ofi_priority"]);
        assert_eq!(open_mpi_transport(&ucx).as_deref(), Some("pml ucx"));
        let cm = names(&["pml_cm_priority", "mtl_psm2_priority", "btl_tcp_links"]);
        assert_eq!(open_mpi_transport(&cm).as_deref(), Some("pml cm over mtl psm2"));
    }

    #[test]
    fn no_single_point_to_point_layer_gives_none() {
        assert_eq!(open_mpi_transport(&names(&["pml_ob1_priority", "pml_ucx_tls"])), None);
        assert_eq!(open_mpi_transport(&names(&["MPIR_CVAR_CH4_NETMOD", "MPIR_CVAR_ASYNC_PROGRESS"])), None);
        assert_eq!(open_mpi_transport(&[]), None);
    }

    #[test]
    fn only_set_transport_variables_are_shown() {
        let env = chosen_by_env(|v| match v {
            "UCX_TLS" => Some("tcp".into()),
            "OMPI_MCA_pml" => Some("ucx".into()),
            _ => None,
        });
        assert_eq!(env, ["UCX_TLS=tcp", "OMPI_MCA_pml=ucx"]);
        assert!(chosen_by_env(|_| None).is_empty());
    }
}
