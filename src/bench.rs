//! `ttrl-serve bench`: decode, prefill and training throughput (figures, never assertions).

use anyhow::Result;
use clap::Args;

use crate::ModelArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let _ = args.model.load()?;
    Ok(())
}
