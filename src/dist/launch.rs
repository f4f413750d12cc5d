//! Where a process stands in a data-parallel job, read from the variables that cluster
//! launchers set: torchrun's (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`) or Slurm's (`SLURM_PROCID`, `SLURM_NTASKS`,
//! `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE`, with `MASTER_ADDR`/`MASTER_PORT` or else the
//! first host of `SLURM_JOB_NODELIST` and a port derived from `SLURM_JOB_ID`).
//!
//! torchrun's variables win when both sets are present (torchrun run inside a Slurm
//! allocation).
//!
//! The rendezvous listens on rank 0's host at `MASTER_PORT`, except under a torchrun whose
//! agent serves its own store there (`TORCHELASTIC_USE_AGENT_STORE=True`, as torchrun sets
//! it since PyTorch 2): then on the port after it. `MGKD_RENDEZVOUS_PORT` overrides both. None of them set: one process, as without a launcher ([`Launch::from_env`]
//! returns `None`). A malformed or inconsistent value is an error naming the variable.

use crate::{Error, Result};

/// The rendezvous port derived from `SLURM_JOB_ID` when `MASTER_PORT` is not set:
/// `SLURM_PORT_BASE + job_id mod SLURM_PORT_SPAN`, so that concurrent jobs on a node differ.
pub const SLURM_PORT_BASE: u16 = 20_000;
/// See [`SLURM_PORT_BASE`].
pub const SLURM_PORT_SPAN: u16 = 20_000;

/// Environment variable naming the rendezvous port outright (the same on every rank).
pub const RENDEZVOUS_PORT_ENV: &str = "MGKD_RENDEZVOUS_PORT";
/// torchrun's variable saying that its agent serves a store at `MASTER_PORT` (`"True"`).
pub const AGENT_STORE_ENV: &str = "TORCHELASTIC_USE_AGENT_STORE";

/// One process's place in a data-parallel job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Rank among the processes of this node: the GPU it uses.
    pub local_rank: usize,
    /// Processes on this node, when the launcher says.
    pub local_world_size: Option<usize>,
    /// Host of rank 0's rendezvous.
    pub master_addr: String,
    /// Port of rank 0's rendezvous (see the module documentation).
    pub master_port: u16,
    /// Which launcher's variables were read: `"torchrun"` or `"slurm"`.
    pub launcher: &'static str,
}

/// A parsed non-negative integer variable, or an error naming it.
fn number(name: &str, value: &str) -> Result<usize> {
    value.trim().parse::<usize>().map_err(|_| {
        Error::invalid(format!(
            "the launcher variable {name}={value:?} is not a non-negative integer"
        ))
    })
}

impl Launch {
    /// The launch described by the process environment (see the module documentation).
    pub fn from_env() -> Result<Option<Launch>> {
        Launch::from_vars(|name| std::env::var(name).ok())
    }

    /// The launch described by the variables `get` returns (the environment, or a test's
    /// table); `None` when no launcher variable is set.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let need = |name: &str| {
            get(name).ok_or_else(|| {
                Error::invalid(format!(
                    "{name} is not set, but other launcher variables are (a data-parallel \
                     run needs RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from \
                     torchrun, or SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID from srun)"
                ))
            })
        };
        let opt_number = |name: &str| get(name).map(|v| number(name, &v)).transpose();
        let mut launch = if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            let world_size = number("WORLD_SIZE", &need("WORLD_SIZE")?)?;
            let rank = number("RANK", &need("RANK")?)?;
            let local_rank = match world_size {
                1 => opt_number("LOCAL_RANK")?.unwrap_or(0),
                _ => number("LOCAL_RANK", &need("LOCAL_RANK")?)?,
            };
            let (master_addr, master_port) = match (get("MASTER_ADDR"), get("MASTER_PORT")) {
                (None, None) if world_size == 1 => ("127.0.0.1".to_string(), 0),
                _ => (
                    need("MASTER_ADDR")?,
                    port("MASTER_PORT", &need("MASTER_PORT")?)?,
                ),
            };
            Launch {
                rank,
                world_size,
                local_rank,
                local_world_size: opt_number("LOCAL_WORLD_SIZE")?,
                master_addr,
                master_port,
                launcher: "torchrun",
            }
        } else if get("SLURM_PROCID").is_some() {
            let master_addr = match get("MASTER_ADDR") {
                Some(a) => a,
                None => {
                    let list = need("SLURM_JOB_NODELIST")?;
                    first_host(&list).ok_or_else(|| {
                        Error::invalid(format!(
                            "SLURM_JOB_NODELIST={list:?}: cannot read its first host; set \
                             MASTER_ADDR to rank 0's host"
                        ))
                    })?
                }
            };
            let master_port = match get("MASTER_PORT") {
                Some(p) => port("MASTER_PORT", &p)?,
                None => {
                    let job = number("SLURM_JOB_ID", &need("SLURM_JOB_ID")?)?;
                    SLURM_PORT_BASE + (job % usize::from(SLURM_PORT_SPAN)) as u16
                }
            };
            Launch {
                rank: number("SLURM_PROCID", &need("SLURM_PROCID")?)?,
                world_size: number("SLURM_NTASKS", &need("SLURM_NTASKS")?)?,
                local_rank: number("SLURM_LOCALID", &need("SLURM_LOCALID")?)?,
                local_world_size: match get("SLURM_NTASKS_PER_NODE") {
                    // "4" or "4(x2)" or "4,2": the first node's count is enough to check.
                    Some(v) => {
                        let head = v.split([',', '(']).next().unwrap_or_default();
                        Some(number("SLURM_NTASKS_PER_NODE", head)?)
                    }
                    None => None,
                },
                master_addr,
                master_port,
                launcher: "slurm",
            }
        } else {
            return Ok(None);
        };
        launch.master_port = match get(RENDEZVOUS_PORT_ENV) {
            Some(p) => port(RENDEZVOUS_PORT_ENV, &p)?,
            None if launch.launcher == "torchrun"
                && launch.world_size > 1
                && get(AGENT_STORE_ENV).as_deref() == Some("True") =>
            {
                launch.master_port.checked_add(1).ok_or_else(|| {
                    Error::invalid(format!(
                        "MASTER_PORT=65535 is torchrun's store ({AGENT_STORE_ENV}=True) and \
                         has no next port for the rendezvous: set {RENDEZVOUS_PORT_ENV}"
                    ))
                })?
            }
            None => launch.master_port,
        };
        launch.check()?;
        Ok(Some(launch))
    }

    /// Checks the numbers against each other.
    fn check(&self) -> Result<()> {
        let (rank_var, world_var, local_var) = match self.launcher {
            "slurm" => ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
            _ => ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        };
        if self.world_size == 0 {
            return Err(Error::invalid(format!(
                "{world_var}=0: a job has at least one process"
            )));
        }
        if self.rank >= self.world_size {
            return Err(Error::invalid(format!(
                "{rank_var}={} is not below {world_var}={}",
                self.rank, self.world_size
            )));
        }
        if let Some(local) = self.local_world_size {
            if self.local_rank >= local {
                return Err(Error::invalid(format!(
                    "{local_var}={} is not below the node's process count {local}",
                    self.local_rank
                )));
            }
        }
        if self.local_rank >= self.world_size {
            return Err(Error::invalid(format!(
                "{local_var}={} is not below {world_var}={}",
                self.local_rank, self.world_size
            )));
        }
        Ok(())
    }
}

/// A TCP port number from variable `name`.
fn port(name: &str, value: &str) -> Result<u16> {
    match value.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(Error::invalid(format!(
            "the launcher variable {name}={value:?} is not a TCP port (1..65535)"
        ))),
    }
}

/// The first host of a Slurm node list in its simple forms: `node7`, `a,b`, `gpu[03-08]`,
/// `gpu[03-08,12],cpu[1-2]`, `rack1-n[001-004]-ib` (the first host keeps its zero padding:
/// `gpu03`). `None` for an empty or malformed list.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    // The first entry ends at the first comma outside brackets.
    let mut depth = 0i32;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
        if depth < 0 {
            return None;
        }
    }
    let entry = &list[..end];
    if entry.is_empty() {
        return None;
    }
    let Some(open) = entry.find('[') else {
        return (!entry.contains(']')).then(|| entry.to_string());
    };
    let close = open + entry[open..].find(']')?;
    let (prefix, inside, suffix) = (&entry[..open], &entry[open + 1..close], &entry[close + 1..]);
    if suffix.contains('[') || suffix.contains(']') {
        return None;
    }
    let first = inside.split([',', '-']).next()?;
    if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!("{prefix}{first}{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn no_variables_is_one_process() {
        assert_eq!(launch(&[]).unwrap(), None);
        assert_eq!(launch(&[("PATH", "/bin")]).unwrap(), None);
    }

    #[test]
    fn the_rendezvous_port_steps_past_torchruns_store() {
        let torchrun = [
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ];
        let port_with = |extra: &[(&str, &str)]| {
            let vars: Vec<(&str, &str)> = torchrun.iter().chain(extra).copied().collect();
            launch(&vars).map(|l| l.unwrap().master_port)
        };
        assert_eq!(port_with(&[]).unwrap(), 29500);
        assert_eq!(port_with(&[(AGENT_STORE_ENV, "False")]).unwrap(), 29500);
        assert_eq!(port_with(&[(AGENT_STORE_ENV, "True")]).unwrap(), 29501);
        let both = [(AGENT_STORE_ENV, "True"), (RENDEZVOUS_PORT_ENV, "31000")];
        assert_eq!(port_with(&both).unwrap(), 31000);
        let e = port_with(&[(RENDEZVOUS_PORT_ENV, "0")])
            .unwrap_err()
            .to_string();
        assert!(e.contains(RENDEZVOUS_PORT_ENV), "{e}");
        let mut top = torchrun.to_vec();
        top[4] = ("MASTER_PORT", "65535");
        top.push((AGENT_STORE_ENV, "True"));
        let e = launch(&top).unwrap_err().to_string();
        assert!(
            e.contains("65535") && e.contains(RENDEZVOUS_PORT_ENV),
            "{e}"
        );
        // Slurm takes the override too.
        let slurm = launch(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_JOB_NODELIST", "gpu[01-02]"),
            ("SLURM_JOB_ID", "7"),
            (RENDEZVOUS_PORT_ENV, "31001"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(slurm.master_port, 31001);
    }

    #[test]
    fn torchrun_variables() {
        let l = launch(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            l,
            Launch {
                rank: 5,
                world_size: 16,
                local_rank: 1,
                local_world_size: Some(4),
                master_addr: "node0".into(),
                master_port: 29500,
                launcher: "torchrun",
            }
        );
    }

    #[test]
    fn torchrun_world_of_one_needs_no_rendezvous_address() {
        let l = launch(&[("RANK", "0"), ("WORLD_SIZE", "1")])
            .unwrap()
            .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank), (0, 1, 0));
    }

    #[test]
    fn torchrun_errors_name_the_variable() {
        let base = [
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "29500"),
        ];
        let without = |skip: &str| -> Vec<(&str, &str)> {
            base.iter().copied().filter(|(k, _)| *k != skip).collect()
        };
        for var in ["RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"] {
            let e = launch(&without(var)).unwrap_err().to_string();
            assert!(e.contains(&format!("{var} is not set")), "{var}: {e}");
        }
        let mut bad = base.to_vec();
        bad[0] = ("RANK", "2");
        let e = launch(&bad).unwrap_err().to_string();
        assert!(e.contains("RANK=2 is not below WORLD_SIZE=2"), "{e}");
        bad[0] = ("RANK", "one");
        let e = launch(&bad).unwrap_err().to_string();
        assert!(e.contains("RANK=\"one\""), "{e}");
        let mut bad = base.to_vec();
        bad[4] = ("MASTER_PORT", "70000");
        let e = launch(&bad).unwrap_err().to_string();
        assert!(e.contains("MASTER_PORT=\"70000\" is not a TCP port"), "{e}");
        let mut bad = base.to_vec();
        bad.push(("LOCAL_WORLD_SIZE", "1"));
        let e = launch(&bad).unwrap_err().to_string();
        assert!(
            e.contains("LOCAL_RANK=1 is not below the node's process count 1"),
            "{e}"
        );
    }

    #[test]
    fn slurm_variables_with_the_node_list() {
        let l = launch(&[
            ("SLURM_PROCID", "9"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "8(x2)"),
            ("SLURM_JOB_NODELIST", "gpu[07-08]"),
            ("SLURM_JOB_ID", "123456"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank), (9, 16, 1));
        assert_eq!(l.local_world_size, Some(8));
        assert_eq!(l.master_addr, "gpu07");
        assert_eq!(l.master_port, SLURM_PORT_BASE + (123_456 % 20_000) as u16);
        assert_eq!(l.launcher, "slurm");
    }

    #[test]
    fn slurm_with_master_variables_and_torchrun_precedence() {
        let l = launch(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.master_addr.as_str(), l.master_port), ("10.0.0.1", 1234));
        // torchrun inside a Slurm allocation: torchrun's variables describe this process.
        let l = launch(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_LOCALID", "0"),
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "3"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.launcher), (3, "torchrun"));
        let e = launch(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("SLURM_JOB_NODELIST is not set"), "{e}");
    }

    #[test]
    fn first_host_of_simple_node_lists() {
        let cases = [
            ("node7", Some("node7")),
            ("a,b", Some("a")),
            ("gpu[03-08]", Some("gpu03")),
            ("gpu[03-08,12],cpu[1-2]", Some("gpu03")),
            ("gpu[12,03-08]", Some("gpu12")),
            ("rack1-n[001-004]-ib", Some("rack1-n001-ib")),
            (" n[1] ", Some("n1")),
            ("", None),
            ("gpu[", None),
            ("gpu]", None),
            ("gpu[a-b]", None),
            ("gpu[1-2][3-4]", None),
        ];
        for (list, want) in cases {
            assert_eq!(first_host(list).as_deref(), want, "{list:?}");
        }
    }
}
