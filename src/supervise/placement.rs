//! Where `rho run` starts its processes: as its own children on this host, as job steps of the
//! Slurm allocation it runs in (`srun`), or each through a command of the user's that executes it
//! in its place (`ip netns exec`, `numactl`, `taskset`). The run is the same in every case: the
//! processes find each other through the endpoint files in the run directory (a shared
//! filesystem across hosts), which hold the address each binding process advertises.

use std::path::Path;

use anyhow::bail;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use super::child::Role;

/// How the processes of a run are started (`launch` in a run config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "engine", rename_all = "snake_case", deny_unknown_fields)]
pub enum Launch {
    /// Children of `rho run`, on this host (the default).
    #[default]
    Local,
    /// Job steps of the Slurm allocation `rho run` runs in (`sbatch` or `salloc`): each process
    /// is `srun --nodes=1 --ntasks=1 ... rho <role>`, Slurm places it on a node of the
    /// allocation, and a process on a GPU gets one of its own (`--exact --gpus=1`, seen inside
    /// the step as `cuda:0`). The endpoints `rho run` assigns bind every interface and advertise
    /// the node's name.
    Slurm {
        /// More `srun` arguments for every step (`["--mem-per-cpu=4G"]`).
        #[serde(default)]
        srun: Vec<String>,
        /// CPUs of each step on a GPU (`--cpus-per-task`). Default: Slurm's (the allocation's
        /// `--cpus-per-gpu`, else 1). Steps on the CPU share their node's CPUs (`--overlap`).
        #[serde(default)]
        cpus_per_gpu: Option<u32>,
    },
    /// Each process started as `<prefix of its role> rho <role> --config FILE`, where a prefix
    /// is a command that executes the rest in its place (`["ip", "netns", "exec", "host-a"]`,
    /// `["numactl", "--cpunodebind=1"]`); an empty prefix starts the process as `local` does.
    Wrap {
        #[serde(default)]
        loader: Vec<String>,
        #[serde(default)]
        selector: Vec<String>,
        #[serde(default)]
        trainer: Vec<String>,
    },
}

/// The environment variable Slurm sets inside an allocation.
const SLURM_JOB: &str = "SLURM_JOB_ID";

impl Launch {
    /// Refuses what cannot start: `slurm` outside an allocation (with how to get one).
    pub fn check(&self) -> anyhow::Result<()> {
        if let Launch::Slurm { .. } = self {
            if std::env::var_os(SLURM_JOB).is_none() {
                bail!("run config, `launch.engine`: \"slurm\", but this is not inside a Slurm allocation ({SLURM_JOB} is unset): submit the run with `sbatch` (examples/slurm/rho-2x8.sbatch), or run it in `salloc`");
            }
        }
        Ok(())
    }

    /// The endpoint a process binds when the run config names none: loopback, except for job
    /// steps, which bind every interface (other nodes connect to the advertised node name).
    pub fn default_bind(&self) -> &'static str {
        match self {
            Launch::Slurm { .. } => "tcp://0.0.0.0:0",
            Launch::Local | Launch::Wrap { .. } => "tcp://127.0.0.1:0",
        }
    }

    /// The device a process of this launch names for `device`: inside a job step with a GPU of
    /// its own, that GPU is `cuda:0`.
    pub fn device_in_step(&self, device: rho_model::DeviceSpec) -> rho_model::DeviceSpec {
        match (self, device) {
            (Launch::Slurm { .. }, rho_model::DeviceSpec::Cuda(_)) => {
                rho_model::DeviceSpec::Cuda(0)
            }
            (_, d) => d,
        }
    }

    /// The command that runs `rho <role> --config <config>` as this launch places it; `gpu`
    /// whether the process runs on a GPU. The second value says whether the process is the
    /// direct child of `rho run` (so that it can stop when its parent is gone); a job step's
    /// lifetime is Slurm's.
    pub fn command(&self, exe: &Path, role: Role, config: &Path, gpu: bool) -> (Command, bool) {
        let rho_args = |c: &mut Command| {
            c.arg(exe).args([role.command(), "--config"]).arg(config);
        };
        match self {
            Launch::Local => {
                let mut c = Command::new(exe);
                c.args([role.command(), "--config"]).arg(config);
                (c, true)
            }
            Launch::Wrap {
                loader,
                selector,
                trainer,
            } => {
                let prefix = match role {
                    Role::Loader => loader,
                    Role::Selector(_) => selector,
                    Role::Trainer => trainer,
                };
                let Some((program, args)) = prefix.split_first() else {
                    return Launch::Local.command(exe, role, config, gpu);
                };
                let mut c = Command::new(program);
                c.args(args);
                rho_args(&mut c);
                (c, true)
            }
            Launch::Slurm { srun, cpus_per_gpu } => {
                let mut c = Command::new("srun");
                c.args(srun_args(role, gpu, *cpus_per_gpu)).args(srun);
                rho_args(&mut c);
                (c, false)
            }
        }
    }
}

/// The `srun` arguments of one process's job step.
fn srun_args(role: Role, gpu: bool, cpus_per_gpu: Option<u32>) -> Vec<String> {
    let mut args = vec![
        "--nodes=1".to_string(),
        "--ntasks=1".into(),
        format!("--job-name=rho-{}", role.name()),
        // A step that fails ends at once rather than leaving the run waiting on it.
        "--kill-on-bad-exit=1".into(),
        // Output lines reach `rho run` as they are written.
        "--unbuffered".into(),
    ];
    match gpu {
        true => {
            args.extend(["--exact".to_string(), "--gpus=1".into()]);
            args.extend(cpus_per_gpu.map(|n| format!("--cpus-per-task={n}")));
        }
        false => args.push("--overlap".into()),
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(c: &Command) -> Vec<String> {
        let c = c.as_std();
        std::iter::once(c.get_program())
            .chain(c.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn each_engine_starts_the_same_process_its_own_way() {
        let exe = Path::new("/bin/rho");
        let cfg = Path::new("/run/selector-1.json");
        let (c, direct) = Launch::Local.command(exe, Role::Selector(1), cfg, false);
        assert_eq!(
            argv(&c),
            ["/bin/rho", "selector", "--config", "/run/selector-1.json"]
        );
        assert!(direct);

        let wrap: Launch =
            serde_json::from_str(r#"{"engine": "wrap", "selector": ["ip", "netns", "exec", "b"]}"#)
                .unwrap();
        let (c, direct) = wrap.command(exe, Role::Selector(1), cfg, false);
        assert_eq!(
            argv(&c),
            [
                "ip",
                "netns",
                "exec",
                "b",
                "/bin/rho",
                "selector",
                "--config",
                "/run/selector-1.json"
            ]
        );
        assert!(direct);
        let (c, _) = wrap.command(exe, Role::Loader, cfg, false);
        assert_eq!(
            argv(&c)[0],
            "/bin/rho",
            "an empty prefix starts it directly"
        );

        let slurm: Launch =
            serde_json::from_str(r#"{"engine": "slurm", "srun": ["--mem=0"], "cpus_per_gpu": 8}"#)
                .unwrap();
        let (c, direct) = slurm.command(exe, Role::Selector(1), cfg, true);
        let a = argv(&c);
        assert_eq!(a[0], "srun");
        for want in [
            "--nodes=1",
            "--ntasks=1",
            "--exact",
            "--gpus=1",
            "--cpus-per-task=8",
            "--mem=0",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} in {a:?}");
        }
        assert!(!a.iter().any(|x| x == "--overlap"));
        assert_eq!(
            &a[a.len() - 4..],
            ["/bin/rho", "selector", "--config", "/run/selector-1.json"]
        );
        assert!(!direct, "a job step's lifetime is Slurm's");
        let (c, _) = slurm.command(exe, Role::Loader, cfg, false);
        let a = argv(&c);
        assert!(
            a.iter().any(|x| x == "--overlap") && !a.iter().any(|x| x == "--gpus=1"),
            "{a:?}"
        );
    }

    #[test]
    fn job_steps_bind_every_interface_and_see_their_gpu_as_the_first() {
        let slurm = Launch::Slurm {
            srun: vec![],
            cpus_per_gpu: None,
        };
        assert_eq!(slurm.default_bind(), "tcp://0.0.0.0:0");
        assert_eq!(Launch::Local.default_bind(), "tcp://127.0.0.1:0");
        use rho_model::DeviceSpec;
        assert_eq!(
            slurm.device_in_step(DeviceSpec::Cuda(3)),
            DeviceSpec::Cuda(0)
        );
        assert_eq!(slurm.device_in_step(DeviceSpec::Cpu), DeviceSpec::Cpu);
        assert_eq!(
            Launch::Local.device_in_step(DeviceSpec::Cuda(3)),
            DeviceSpec::Cuda(3)
        );
        let unknown = serde_json::from_str::<Launch>(r#"{"engine": "pbs"}"#).unwrap_err();
        assert!(unknown.to_string().contains("unknown variant"), "{unknown}");
    }
}
