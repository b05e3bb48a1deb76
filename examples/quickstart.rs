//! The main job: `cargo run --release --example quickstart [-- --smoke] [--data-dir DIR] [--rounds N] [--model DIR [--lora-rank N]] [--method llama3|grpo]`.
//!
//! Starts an embedded herd daemon (sled in a local data directory, CPU),
//! builds a tiny Llama from scratch (or takes a Hugging Face model directory
//! with `--model`), runs rounds of the Llama 3 loop through the HTTP API,
//! reproduces a round, and prints a table per round.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // The daemon starts jobs as `<this program> worker --job-file F`.
    if args.get(1).map(|a| a == "worker").unwrap_or(false) {
        let file = args
            .iter()
            .position(|a| a == "--job-file")
            .and_then(|i| args.get(i + 1))
            .expect("--job-file");
        std::process::exit(herd_daemon::worker::main(std::path::Path::new(file), None));
    }
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    // Anything else is a mistake worth saying (a misspelt flag would
    // otherwise run the full job with defaults).
    let mut rest = args.iter().skip(1);
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--smoke" => {}
            "--data-dir" | "--rounds" | "--model" | "--lora-rank" | "--method" => {
                rest.next();
            }
            other => {
                eprintln!(
                    "quickstart: unknown argument {other:?} (expected --smoke, --data-dir DIR, --rounds N, --model DIR, --lora-rank N, --method llama3|grpo)"
                );
                std::process::exit(2);
            }
        }
    }
    let smoke = args.iter().any(|a| a == "--smoke");
    let exe = std::env::current_exe()
        .expect("current exe")
        .display()
        .to_string();
    let grpo = flag("--method").as_deref() == Some("grpo");
    let opts = herd::quickstart::Options {
        data_dir: flag("--data-dir").map(Into::into),
        // GRPO's rounds are one job each, ~7 s here: 24 of them (under
        // four minutes) take the tiny model from 0.38 to 0.80 (README).
        rounds: flag("--rounds")
            .map(|r| r.parse().expect("--rounds N"))
            .unwrap_or(match (smoke, grpo) {
                (true, _) => 2,
                (false, true) => 24,
                (false, false) => 3,
            }),
        worker_command: vec![exe, "worker".into()],
        quiet: false,
        model: flag("--model").map(Into::into),
        lora_rank: flag("--lora-rank").map(|r| r.parse().expect("--lora-rank N")),
        method: match flag("--method").as_deref() {
            None | Some("llama3") => herd::quickstart::Method::Llama3,
            Some("grpo") => herd::quickstart::Method::Grpo,
            Some(other) => {
                eprintln!("quickstart: --method {other:?}: expected llama3 or grpo");
                std::process::exit(2);
            }
        },
    };
    match herd::quickstart::run(&opts) {
        Ok(report) => {
            println!("\n{}", herd::quickstart::table(&report));
            let last = report.rounds.last().map(|r| r.task_accuracy).unwrap_or(0.0);
            println!(
                "held-out task accuracy: base {:.3} -> after round {} {:.3}",
                report.base_accuracy,
                report.rounds.len(),
                last
            );
            if !report.reproduced_identical || !report.store_verified {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("quickstart failed: {e:#}");
            std::process::exit(1);
        }
    }
}
