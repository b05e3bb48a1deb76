//! The one list of recipes, and what is asked of it: a kind's recipe, the
//! outputs a job makes and their kinds, `GET /kinds`. Nothing else matches
//! on the kind, so a new recipe is one new file, one line in [`RECIPES`]
//! and its name in `herd_core::JobKind`.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use anyhow::Result;
use herd_core::{ArtifactKind, JobKind};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::recipe::{Bound, InputNames, InputSource, JobContext, OutputKind, Recipe, Validate};
use super::{
    annotate, average, chat_format, curate, dpo, eval, generate, grpo, merge, mix, rm, sample, sft,
};

/// A recipe behind a vtable, for the registry.
pub trait AnyRecipe: Sync {
    fn kind(&self) -> JobKind;
    fn inputs(&self) -> InputNames;
    fn outputs(&self) -> &'static [(&'static str, OutputKind)];
    fn accepts(&self, input: &str) -> &'static [ArtifactKind];
    /// See [`Recipe::COLLECTS_PREFERENCES`].
    fn collects_preferences(&self) -> Option<&'static str>;
    fn default_hyperparameters(&self) -> Value;
    /// The numeric ranges checked at submit.
    fn bounds(&self) -> Vec<Bound>;
    /// Parse and validate a full hyperparameter set.
    fn check(&self, hyperparameters: &Value) -> Result<(), String>;
    /// Check (already checked) hyperparameters against the input names.
    fn check_with_inputs(&self, hyperparameters: &Value, inputs: &[&str]) -> Result<(), String>;
    /// Whether such a job makes output `output` (see [`Recipe::makes`]).
    fn makes(&self, hyperparameters: &Value, inputs: &[&str], output: &str) -> bool;
    /// See [`Recipe::choose_inputs`].
    fn choose_inputs(
        &self,
        hyperparameters: &Value,
        resolved: &mut BTreeMap<String, String>,
        source: &dyn Fn(&str) -> Option<InputSource>,
    ) -> Result<Option<String>>;
    /// Parse the (already checked) hyperparameters and run.
    fn run(&self, ctx: &mut JobContext) -> Result<Value>;
}

struct Erased<R>(PhantomData<R>);

impl<R: Recipe> AnyRecipe for Erased<R> {
    fn kind(&self) -> JobKind {
        R::KIND
    }
    fn inputs(&self) -> InputNames {
        R::INPUTS
    }
    fn outputs(&self) -> &'static [(&'static str, OutputKind)] {
        R::OUTPUTS
    }
    fn accepts(&self, input: &str) -> &'static [ArtifactKind] {
        R::accepts(input)
    }
    fn collects_preferences(&self) -> Option<&'static str> {
        R::COLLECTS_PREFERENCES
    }
    fn default_hyperparameters(&self) -> Value {
        serde_json::to_value(R::Params::default()).expect("params serialize")
    }
    fn bounds(&self) -> Vec<Bound> {
        R::Params::bounds()
    }
    fn check(&self, hyperparameters: &Value) -> Result<(), String> {
        parse::<R::Params>(hyperparameters).map(drop)
    }
    fn check_with_inputs(&self, hyperparameters: &Value, inputs: &[&str]) -> Result<(), String> {
        R::check_with_inputs(&parse::<R::Params>(hyperparameters)?, inputs)
    }
    fn makes(&self, hyperparameters: &Value, inputs: &[&str], output: &str) -> bool {
        // Jobs record their effective hyperparameters, so they parse as
        // they are; should they not, say the output may exist.
        parse::<R::Params>(hyperparameters).map_or(true, |p| p.makes(inputs, output))
    }
    fn choose_inputs(
        &self,
        hyperparameters: &Value,
        resolved: &mut BTreeMap<String, String>,
        source: &dyn Fn(&str) -> Option<InputSource>,
    ) -> Result<Option<String>> {
        let params = parse::<R::Params>(hyperparameters).map_err(anyhow::Error::msg)?;
        R::choose_inputs(&params, resolved, source)
    }
    fn run(&self, ctx: &mut JobContext) -> Result<Value> {
        let params = parse::<R::Params>(&ctx.hyperparameters).map_err(anyhow::Error::msg)?;
        R::run(ctx, params)
    }
}

fn parse<P: DeserializeOwned + Validate>(v: &Value) -> Result<P, String> {
    let p: P = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    p.validate()?;
    Ok(p)
}

/// Every recipe herd runs.
pub static RECIPES: [&dyn AnyRecipe; 13] = [
    &Erased::<rm::Rm>(PhantomData),
    &Erased::<sample::Sample>(PhantomData),
    &Erased::<sft::Sft>(PhantomData),
    &Erased::<dpo::Dpo>(PhantomData),
    &Erased::<average::Average>(PhantomData),
    &Erased::<curate::Curate>(PhantomData),
    &Erased::<eval::Eval>(PhantomData),
    &Erased::<annotate::Annotate>(PhantomData),
    &Erased::<mix::Mix>(PhantomData),
    &Erased::<merge::Merge>(PhantomData),
    &Erased::<generate::Generate>(PhantomData),
    &Erased::<chat_format::ChatFormat>(PhantomData),
    &Erased::<grpo::Grpo>(PhantomData),
];

/// The recipe of `kind`; external runs have none (herd records them, it
/// does not run them).
pub fn recipe(kind: JobKind) -> Result<&'static dyn AnyRecipe, String> {
    RECIPES
        .iter()
        .copied()
        .find(|r| r.kind() == kind)
        .ok_or_else(|| format!("{kind} jobs are recorded, not run by herd"))
}

/// The artifact kind of output `output` of a `kind` job with `inputs` (name
/// -> reference) and `hyperparameters`; `kind_of` tells the artifact kind a
/// reference points at. None: the job makes no such output (or an input it
/// follows is unknown).
pub fn output_kind(
    kind: JobKind,
    output: &str,
    inputs: &BTreeMap<String, String>,
    hyperparameters: &Value,
    kind_of: impl Fn(&str) -> Option<ArtifactKind>,
) -> Option<ArtifactKind> {
    let r = recipe(kind).ok()?;
    let (_, of) = r.outputs().iter().find(|(name, _)| *name == output)?;
    let names: Vec<&str> = inputs.keys().map(|k| k.as_str()).collect();
    if !r.makes(hyperparameters, &names, output) {
        return None;
    }
    match of {
        OutputKind::Is(a) => Some(*a),
        OutputKind::SameAs(input) => kind_of(inputs.get(*input)?),
        OutputKind::SameAsInputs => kind_of(inputs.values().next()?),
        OutputKind::WhenInputsAre(a) => (kind_of(inputs.values().next()?)? == *a).then_some(*a),
    }
}

/// The outputs such a job makes (see [`output_kind`]).
pub fn outputs_made(
    kind: JobKind,
    inputs: &BTreeMap<String, String>,
    hyperparameters: &Value,
    kind_of: impl Fn(&str) -> Option<ArtifactKind>,
) -> Vec<&'static str> {
    output_names(kind)
        .into_iter()
        .filter(|o| output_kind(kind, o, inputs, hyperparameters, &kind_of).is_some())
        .collect()
}

/// What a recipe takes and makes, for `GET /kinds` and `herd kinds`.
pub fn describe(r: &dyn AnyRecipe) -> herd_core::wire::KindInfo {
    use herd_core::wire::{KindInfo, KindInput, KindOutput};
    let input = |name: &str, required| KindInput {
        name: name.to_string(),
        required,
        accepts: r.accepts(name).to_vec(),
    };
    let (inputs, at_least) = match r.inputs() {
        InputNames::Named { required, optional } => (
            required
                .iter()
                .map(|n| input(n, true))
                .chain(optional.iter().map(|n| input(n, false)))
                .collect(),
            None,
        ),
        InputNames::AtLeast(n) => (vec![], Some(n)),
    };
    KindInfo {
        kind: r.kind(),
        inputs,
        at_least,
        at_least_accepts: match at_least {
            Some(_) => r.accepts("*").to_vec(),
            None => vec![],
        },
        outputs: r
            .outputs()
            .iter()
            .map(|(name, of)| KindOutput {
                name: name.to_string(),
                artifact: match of {
                    OutputKind::Is(a) | OutputKind::WhenInputsAre(a) => Some(*a),
                    OutputKind::SameAs(_) | OutputKind::SameAsInputs => None,
                },
                same_as: match of {
                    OutputKind::SameAs(i) => Some(i.to_string()),
                    OutputKind::SameAsInputs => Some("*".to_string()),
                    OutputKind::Is(_) | OutputKind::WhenInputsAre(_) => None,
                },
            })
            .collect(),
        hyperparameters: r.default_hyperparameters(),
        ranges: r
            .bounds()
            .iter()
            .map(|b| (b.name.to_string(), b.text()))
            .collect(),
    }
}

/// The job kinds as a Markdown table (API.md carries it; a test keeps it
/// equal to the registry).
pub fn kinds_markdown() -> String {
    let mut out = String::from(
        "| kind | inputs (artifact kinds accepted; ? optional) | outputs | hyperparameters (default, accepted range) |\n|---|---|---|---|\n",
    );
    for r in RECIPES {
        let k = describe(r);
        let names = |kinds: &[ArtifactKind]| {
            kinds
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join("\\|")
        };
        let mut inputs: Vec<String> = k
            .inputs
            .iter()
            .map(|i| {
                let opt = if i.required { "" } else { "?" };
                format!("`{}`{opt} ({})", i.name, names(&i.accepts))
            })
            .collect();
        if let Some(n) = k.at_least {
            inputs.push(format!(
                "{n} or more, any names ({})",
                names(&k.at_least_accepts)
            ));
        }
        let outputs: Vec<String> = k
            .outputs
            .iter()
            .map(|o| match (&o.artifact, &o.same_as) {
                (Some(a), _) => format!("`{}` ({})", o.name, a.as_str()),
                (None, Some(i)) if i == "*" => format!("`{}` (the kind of its inputs)", o.name),
                (None, Some(i)) => format!("`{}` (the kind of `{i}`)", o.name),
                (None, None) => format!("`{}`", o.name),
            })
            .collect();
        let hp: Vec<String> = k
            .hyperparameters
            .as_object()
            .into_iter()
            .flatten()
            .map(|(n, v)| match k.ranges.get(n) {
                Some(r) => format!("{n}={v} {r}"),
                None => format!("{n}={v}"),
            })
            .collect();
        out += &format!(
            "| `{}` | {} | {} | {} |\n",
            k.kind.as_str(),
            inputs.join(", "),
            outputs.join(", "),
            hp.join(", ")
        );
    }
    out
}

/// The output names of a `kind` job.
pub fn output_names(kind: JobKind) -> Vec<&'static str> {
    recipe(kind)
        .map(|r| r.outputs().iter().map(|(n, _)| *n).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// API.md's table of job kinds is the registry's (regenerate with
    /// HERD_UPDATE_DOCS=1 cargo test -p herd-daemon kinds_table).
    #[test]
    fn api_md_kinds_table_matches_the_registry() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../API.md");
        let doc = std::fs::read_to_string(&path).unwrap();
        let (begin, end) = ("<!-- kinds:begin -->\n", "<!-- kinds:end -->");
        let a = doc.find(begin).expect("API.md has a kinds:begin marker") + begin.len();
        let b = doc.find(end).expect("API.md has a kinds:end marker");
        let table = kinds_markdown();
        if std::env::var_os("HERD_UPDATE_DOCS").is_some() {
            std::fs::write(&path, format!("{}{table}{}", &doc[..a], &doc[b..])).unwrap();
            return;
        }
        assert_eq!(
            doc[a..b],
            table,
            "API.md's kinds table is stale: HERD_UPDATE_DOCS=1 cargo test -p herd-daemon api_md_kinds_table"
        );
    }

    /// Each listed range is what `check` enforces: the ends it includes are
    /// accepted, just past each end is refused (over the defaults).
    #[test]
    fn listed_ranges_are_the_enforced_ones() {
        for r in RECIPES {
            let defaults = r.default_hyperparameters();
            let with = |name: &str, x: f64| {
                let mut hp = defaults.clone();
                hp[name] = if defaults[name].is_u64() || defaults[name].is_i64() {
                    if x < 0.0 {
                        serde_json::json!(x as i64)
                    } else {
                        serde_json::json!(x as u64)
                    }
                } else {
                    serde_json::json!(x)
                };
                r.check(&hp)
            };
            for b in r.bounds() {
                let what = format!("{} {} {}", r.kind(), b.name, b.text());
                assert!(
                    defaults.get(b.name).is_some(),
                    "{what}: no such hyperparameter"
                );
                let step = if defaults[b.name].is_u64() {
                    1.0
                } else {
                    1e-9_f64.max(b.min.abs() * 1e-9)
                };
                if b.min_inclusive {
                    assert!(with(b.name, b.min).is_ok(), "{what}: min refused");
                    assert!(
                        with(b.name, b.min - step).is_err(),
                        "{what}: below min accepted"
                    );
                } else {
                    assert!(with(b.name, b.min).is_err(), "{what}: open min accepted");
                    assert!(
                        with(b.name, b.min + step).is_ok(),
                        "{what}: just above min refused"
                    );
                }
                if let Some(max) = b.max {
                    let step = if defaults[b.name].is_u64() {
                        1.0
                    } else {
                        1e-9_f64.max(max.abs() * 1e-9)
                    };
                    if b.max_inclusive {
                        assert!(with(b.name, max).is_ok(), "{what}: max refused");
                    } else {
                        assert!(with(b.name, max).is_err(), "{what}: open max accepted");
                        assert!(
                            with(b.name, max - step).is_ok(),
                            "{what}: just below max refused"
                        );
                    }
                    assert!(
                        with(b.name, max + step).is_err(),
                        "{what}: above max accepted"
                    );
                }
            }
        }
    }

    #[test]
    fn every_recipe_kind_is_listed_once() {
        for kind in JobKind::RECIPES {
            assert_eq!(
                RECIPES.iter().filter(|r| r.kind() == kind).count(),
                1,
                "{kind}"
            );
        }
        assert!(recipe(JobKind::External).is_err());
    }
}
