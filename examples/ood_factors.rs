//! Which part of the `ood` appearance costs a bundle its accuracy.
//!
//! Scores `id` clips (seen actions, seen appearance) with one part of an `ood` appearance
//! swapped in at a time (body proportions, each of them alone, clothing colours, the wall's
//! texture, the wall's colours) and with all of it, through the same path as `clipact eval`.
//!
//! ```text
//! cargo run --release --example ood_factors -- models/demo [clips per action, default 40]
//! ```

use std::path::Path;

use anyhow::Context;
use clipact::bundle::Bundle;
use clipact::eval::{evaluate_rendered, Candidates, EvalOptions, SyntheticSource};
use clipact::world::math::{mix, Rng};
use clipact::world::render::Appearance;
use clipact::world::{self, actions_in, appearance, render_clip_as, Split};
use clipact::wti::Interaction;

/// Copies one part of `ood` into `seen`.
type Swap = fn(&mut Appearance, &Appearance);

const FACTORS: [(&str, Swap); 10] = [
    ("nothing (id)", |_, _| {}),
    ("body proportions", |a, o| a.body = o.body),
    ("  limb thickness", |a, o| (a.body.limb_r, a.body.torso_r) = (o.body.limb_r, o.body.torso_r)),
    ("  head size", |a, o| a.body.head_r = o.body.head_r),
    ("  shoulder width", |a, o| (a.body.shoulder_half, a.body.hip_half) = (o.body.shoulder_half, o.body.hip_half)),
    ("  leg length", |a, o| (a.body.thigh, a.body.shin) = (o.body.thigh, o.body.shin)),
    ("clothing hues", |a, o| (a.shirt, a.trousers) = (o.shirt, o.trousers)),
    ("wall texture", |a, o| a.backdrop = o.backdrop),
    ("wall and floor hues", |a, o| {
        (a.wall_top, a.wall_bottom, a.floor, a.props) = (o.wall_top, o.wall_bottom, o.floor, o.props.clone())
    }),
    ("everything (ood)", |a, o| *a = o.clone()),
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).map_or("models/demo", String::as_str);
    let per_action: usize = args.get(2).map_or(Ok(40), |s| s.parse()).context("clips per action")?;
    let bundle = Bundle::open(Path::new(dir)).with_context(|| format!("opening bundle {dir}"))?;
    let interaction = if bundle.temporal_path().is_some() {
        Interaction::WeightedTokenWiseTemporal
    } else {
        Interaction::WeightedTokenWise
    };
    let opts = EvalOptions {
        source: SyntheticSource { seed: 7, split: Split::Id },
        clips: per_action * actions_in(Split::Id).len(),
        interactions: vec![interaction],
        candidates: Candidates::Split,
        int8: false,
    };
    println!("{dir}, {} {} clips, top-1 with one part of the ood appearance:", opts.clips, interaction.name());
    for (name, swap) in FACTORS {
        let mut render = |action, seed, cfg: &world::RenderConfig| {
            let mut seen = appearance(Split::Id, seed);
            let ood = Appearance::sample(&mut Rng::new(mix(&[seed, 0x00D]), 1), true);
            swap(&mut seen, &ood);
            render_clip_as(seen, Split::Id, action, seed, cfg)
        };
        let report = evaluate_rendered(&bundle, &opts, &mut render, &mut |_, _| {})?;
        println!("{name:22} {:5.1} %", report[0].top1 * 100.0);
    }
    Ok(())
}
