//! A small ONNX writer: build a graph node by node, get a `ModelProto` or its bytes.
//!
//! This is the foundation of the student encoder's export (opset 17, static shapes, f32
//! weights) and of the test graphs that exercise the [`encoder`](crate::encoder). It writes
//! the protobuf types that `tract-onnx` itself reads ([`tract_onnx::pb`]), so whatever this
//! module writes, the device runtime parses with the same definitions.
//!
//! The builder knows nothing about operators: a node is an op type, input and output value
//! names and [`Attribute`]s (int, ints, float, floats, string). That covers the operators a
//! small ViT needs (MatMul, Add, Gemm, Reshape, Flatten, Relu, Sigmoid, Tanh, Mul, Transpose,
//! Softmax, ReduceMean, Conv, ...). Opset 17 conventions apply: `Reshape` takes its target
//! shape as an i64 *input* (see [`GraphBuilder::initializer_i64`]), `ReduceMean` takes `axes`
//! as an *attribute* (it became an input only in opset 18).
//!
//! ```
//! use clipact::onnx::{Attribute, GraphBuilder};
//!
//! let mut g = GraphBuilder::new("tiny");
//! g.input("x", &[1, 4]);
//! let w = g.initializer("w", &[4, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]);
//! g.node("MatMul", &["x", &w], &["xw"], []);
//! g.node("Softmax", &["xw"], &["y"], [Attribute::int("axis", -1)]);
//! g.output("y", &[1, 2]);
//! g.validate().unwrap();
//! let bytes: Vec<u8> = g.to_bytes();
//! assert!(!bytes.is_empty());
//! ```

use std::collections::HashSet;
use std::fmt;

use prost::Message;
use tract_onnx::pb;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;

/// The ONNX operator set the writer declares (default domain). tract is tested on 9 to 18.
pub const OPSET_VERSION: i64 = 17;
/// The ONNX IR version the writer declares (IR 8 goes with opsets up to 18).
pub const IR_VERSION: i64 = 8;
/// The `producer_name` written into every model.
pub const PRODUCER_NAME: &str = "clipact";

/// One attribute of a node: a named int, float, string or list of them.
///
/// ```
/// use clipact::onnx::Attribute;
/// let a = Attribute::ints("kernel_shape", [16, 16]);
/// assert_eq!(a.name(), "kernel_shape");
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Attribute(pb::AttributeProto);

impl Attribute {
    fn proto(name: &str, ty: AttributeType) -> pb::AttributeProto {
        pb::AttributeProto { name: name.to_owned(), r#type: ty as i32, ..Default::default() }
    }

    /// A single integer (`axis`, `keepdims`, `transB`, `group`, ...).
    pub fn int(name: &str, value: i64) -> Self {
        Attribute(pb::AttributeProto { i: value, ..Self::proto(name, AttributeType::Int) })
    }

    /// A list of integers (`perm`, `axes`, `kernel_shape`, `strides`, `pads`, ...).
    pub fn ints(name: &str, values: impl IntoIterator<Item = i64>) -> Self {
        Attribute(pb::AttributeProto { ints: values.into_iter().collect(), ..Self::proto(name, AttributeType::Ints) })
    }

    /// A single float (`alpha`, `beta`, `epsilon`, ...).
    pub fn float(name: &str, value: f32) -> Self {
        Attribute(pb::AttributeProto { f: value, ..Self::proto(name, AttributeType::Float) })
    }

    /// A list of floats.
    pub fn floats(name: &str, values: impl IntoIterator<Item = f32>) -> Self {
        Attribute(pb::AttributeProto {
            floats: values.into_iter().collect(),
            ..Self::proto(name, AttributeType::Floats)
        })
    }

    /// A string (`auto_pad`, `mode`, ...).
    pub fn string(name: &str, value: &str) -> Self {
        Attribute(pb::AttributeProto { s: value.as_bytes().to_vec(), ..Self::proto(name, AttributeType::String) })
    }

    /// The attribute's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The protobuf message this attribute is written as.
    pub fn into_proto(self) -> pb::AttributeProto {
        self.0
    }
}

/// A problem found by [`GraphBuilder::validate`]: the graph would not load, or would load
/// with a meaning other than intended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GraphError {
    /// Two graph inputs, initializers or node outputs carry the same value name.
    DuplicateValue {
        /// The value name defined twice.
        name: String,
    },
    /// A node reads a value that no graph input, initializer or earlier node defines.
    UndefinedInput {
        /// The node (its op type and position in the graph).
        node: String,
        /// The value it reads.
        name: String,
    },
    /// A declared graph output is not defined by anything in the graph.
    UndefinedOutput {
        /// The output's name.
        name: String,
    },
    /// An initializer's data does not fill its shape.
    InitializerSize {
        /// The initializer's name.
        name: String,
        /// The number of elements its shape holds.
        expected: usize,
        /// The number of elements given.
        got: usize,
    },
}

impl fmt::Display for GraphError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GraphError::DuplicateValue { name } => {
                write!(f, "value `{name}` is defined more than once in the graph")
            }
            GraphError::UndefinedInput { node, name } => {
                write!(f, "node {node} reads `{name}`, which no graph input, initializer or earlier node defines")
            }
            GraphError::UndefinedOutput { name } => {
                write!(f, "graph output `{name}` is not produced by any node, input or initializer")
            }
            GraphError::InitializerSize { name, expected, got } => {
                write!(f, "initializer `{name}` has {got} values, its shape holds {expected}")
            }
        }
    }
}

impl std::error::Error for GraphError {}

/// Builds one ONNX graph (opset [`OPSET_VERSION`], f32 activations, static shapes) and wraps it
/// in a model.
///
/// Value names are the wiring: a node's inputs name graph inputs, initializers or earlier
/// nodes' outputs. Nodes must be added in topological order (ONNX requires it).
#[derive(Clone, Debug, Default)]
pub struct GraphBuilder {
    name: String,
    doc: String,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
    initializers: Vec<pb::TensorProto>,
    nodes: Vec<pb::NodeProto>,
    metadata: Vec<pb::StringStringEntryProto>,
}

fn value_info(name: &str, elem_type: DataType, shape: &[i64]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = shape.iter().map(|&d| Dimension { value: Some(Value::DimValue(d)), ..Default::default() }).collect();
    pb::ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem_type as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl GraphBuilder {
    /// An empty graph called `name`.
    pub fn new(name: &str) -> Self {
        GraphBuilder { name: name.to_owned(), ..Default::default() }
    }

    /// Sets the graph's documentation string.
    pub fn doc(&mut self, doc: &str) -> &mut Self {
        self.doc = doc.to_owned();
        self
    }

    /// Adds a model metadata entry (`metadata_props`; tract exposes them as
    /// `onnx.metadata_props.<key>` properties).
    pub fn metadata(&mut self, key: &str, value: &str) -> &mut Self {
        self.metadata.push(pb::StringStringEntryProto { key: key.to_owned(), value: value.to_owned() });
        self
    }

    /// Declares an f32 graph input of a static shape.
    pub fn input(&mut self, name: &str, shape: &[i64]) -> &mut Self {
        self.inputs.push(value_info(name, DataType::Float, shape));
        self
    }

    /// Declares an f32 graph output of a static shape. The value must be defined by a node,
    /// an input or an initializer of the graph.
    pub fn output(&mut self, name: &str, shape: &[i64]) -> &mut Self {
        self.outputs.push(value_info(name, DataType::Float, shape));
        self
    }

    /// Adds an f32 constant (a weight) and returns its name, for use as a node input.
    ///
    /// `data` is row-major; `shape` `[]` is a scalar. A `data` that does not fill `shape` is
    /// reported by [`validate`](Self::validate).
    pub fn initializer(&mut self, name: &str, shape: &[i64], data: &[f32]) -> String {
        let raw_data = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, shape, DataType::Float, raw_data)
    }

    /// Adds a 1-D i64 constant (the target shape of a `Reshape`, the `axes` of an opset-18
    /// reduction, ...) and returns its name.
    pub fn initializer_i64(&mut self, name: &str, data: &[i64]) -> String {
        let raw_data = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, &[data.len() as i64], DataType::Int64, raw_data)
    }

    fn push_initializer(&mut self, name: &str, shape: &[i64], data_type: DataType, raw_data: Vec<u8>) -> String {
        self.initializers.push(pb::TensorProto {
            name: name.to_owned(),
            dims: shape.to_vec(),
            data_type: data_type as i32,
            raw_data,
            ..Default::default()
        });
        name.to_owned()
    }

    /// Adds a node of the default ONNX domain: `op` (e.g. `"MatMul"`) reads the values named
    /// by `inputs` (an empty name is an omitted optional input) and defines those named by
    /// `outputs`.
    ///
    /// The node is named `<op>_<index>`.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: impl IntoIterator<Item = Attribute>,
    ) -> &mut Self {
        let name = format!("{}_{}", op, self.nodes.len());
        self.nodes.push(pb::NodeProto {
            name,
            op_type: op.to_owned(),
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: outputs.iter().map(|s| (*s).to_owned()).collect(),
            attribute: attrs.into_iter().map(Attribute::into_proto).collect(),
            ..Default::default()
        });
        self
    }

    /// Checks the wiring: every value defined once, every node input defined before the node
    /// reads it, every graph output defined, every initializer's data filling its shape.
    ///
    /// tract would also refuse most of these, but later and less precisely.
    pub fn validate(&self) -> Result<(), GraphError> {
        let mut defined: HashSet<&str> = HashSet::new();
        for t in &self.initializers {
            let expected: usize = t.dims.iter().map(|&d| d.max(0) as usize).product();
            let width = if t.data_type == DataType::Int64 as i32 { 8 } else { 4 };
            let got = t.raw_data.len() / width;
            if got != expected {
                return Err(GraphError::InitializerSize { name: t.name.clone(), expected, got });
            }
        }
        let defs = self.inputs.iter().map(|i| i.name.as_str()).chain(self.initializers.iter().map(|t| t.name.as_str()));
        for name in defs {
            if !defined.insert(name) {
                return Err(GraphError::DuplicateValue { name: name.to_owned() });
            }
        }
        for node in &self.nodes {
            for input in node.input.iter().filter(|s| !s.is_empty()) {
                if !defined.contains(input.as_str()) {
                    return Err(GraphError::UndefinedInput {
                        node: format!("`{}` ({})", node.name, node.op_type),
                        name: input.clone(),
                    });
                }
            }
            for output in node.output.iter().filter(|s| !s.is_empty()) {
                if !defined.insert(output.as_str()) {
                    return Err(GraphError::DuplicateValue { name: output.clone() });
                }
            }
        }
        for output in &self.outputs {
            if !defined.contains(output.name.as_str()) {
                return Err(GraphError::UndefinedOutput { name: output.name.clone() });
            }
        }
        Ok(())
    }

    /// The graph alone.
    pub fn into_graph(self) -> pb::GraphProto {
        pb::GraphProto {
            name: self.name,
            doc_string: self.doc,
            node: self.nodes,
            initializer: self.initializers,
            input: self.inputs,
            output: self.outputs,
            ..Default::default()
        }
    }

    /// The model: IR [`IR_VERSION`], default-domain opset [`OPSET_VERSION`], producer
    /// [`PRODUCER_NAME`] at this crate's version.
    pub fn into_model(mut self) -> pb::ModelProto {
        let metadata_props = std::mem::take(&mut self.metadata);
        pb::ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: OPSET_VERSION }],
            producer_name: PRODUCER_NAME.to_owned(),
            producer_version: env!("CARGO_PKG_VERSION").to_owned(),
            metadata_props,
            graph: Some(self.into_graph()),
            ..Default::default()
        }
    }

    /// The model, serialized: the content of an `.onnx` file.
    pub fn to_bytes(self) -> Vec<u8> {
        self.into_model().encode_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::*;

    fn run(bytes: &[u8], input: Tensor) -> Vec<f32> {
        let model =
            tract_onnx::onnx().model_for_read(&mut &*bytes).unwrap().into_optimized().unwrap().into_runnable().unwrap();
        let out = model.run(tvec!(input.into_tvalue())).unwrap();
        out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
    }

    /// Transpose → Reshape → Gemm(transB, alpha) → Relu → Softmax → Mul → ReduceMean → Sigmoid
    /// → Tanh, against the same computation written out.
    #[test]
    fn graph_round_trips_through_tract() {
        let x: Vec<f32> = (0..6).map(|i| i as f32 * 0.3 - 0.7).collect(); // [1,2,3]
        let w: Vec<f32> = (0..8).map(|i| (i as f32 * 0.37).sin()).collect(); // [4,2]
        let b = [0.1f32, -0.2, 0.3, 0.0];

        let mut g = GraphBuilder::new("ops");
        g.input("x", &[1, 2, 3]);
        let shape = g.initializer_i64("shape", &[3, 2]);
        let wn = g.initializer("w", &[4, 2], &w);
        let bn = g.initializer("b", &[4], &b);
        g.node("Transpose", &["x"], &["t"], [Attribute::ints("perm", [0, 2, 1])])
            .node("Reshape", &["t", &shape], &["r"], [])
            .node("Gemm", &["r", &wn, &bn], &["g"], [Attribute::int("transB", 1), Attribute::float("alpha", 0.5)])
            .node("Relu", &["g"], &["relu"], [])
            .node("Softmax", &["relu"], &["s"], [Attribute::int("axis", -1)])
            .node("Mul", &["s", "g"], &["m"], [])
            .node("ReduceMean", &["m"], &["mean"], [Attribute::ints("axes", [1]), Attribute::int("keepdims", 0)])
            .node("Sigmoid", &["mean"], &["sig"], [])
            .node("Tanh", &["sig"], &["y"], [])
            .output("y", &[3]);
        g.validate().unwrap();
        let got = run(&g.to_bytes(), tensor1(&x).into_shape(&[1, 2, 3]).unwrap());

        // by hand: r[i][k] = x[0][k][i]
        let mut want = vec![];
        for i in 0..3 {
            let r = [x[i], x[3 + i]];
            let gv: Vec<f32> = (0..4).map(|o| 0.5 * (r[0] * w[o * 2] + r[1] * w[o * 2 + 1]) + b[o]).collect();
            let relu: Vec<f32> = gv.iter().map(|v| v.max(0.0)).collect();
            let mx = relu.iter().cloned().fold(f32::MIN, f32::max);
            let z: f32 = relu.iter().map(|v| (v - mx).exp()).sum();
            let mean: f32 = (0..4).map(|o| (relu[o] - mx).exp() / z * gv[o]).sum::<f32>() / 4.0;
            want.push((1.0 / (1.0 + (-mean).exp())).tanh());
        }
        assert_eq!(got.len(), 3);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn model_header_and_metadata() {
        let mut g = GraphBuilder::new("id");
        g.input("x", &[2]).node("Relu", &["x"], &["y"], []).output("y", &[2]);
        g.metadata("clipact.kind", "test");
        let model = g.into_model();
        assert_eq!(model.ir_version, 8);
        assert_eq!(model.opset_import[0].version, 17);
        assert_eq!(model.producer_name, "clipact");
        let bytes = model.encode_to_vec();
        let parsed = tract_onnx::onnx().model_for_read(&mut &*bytes).unwrap();
        let key = "onnx.metadata_props.clipact.kind";
        assert!(parsed.properties.contains_key(key), "{:?}", parsed.properties.keys());
        assert_eq!(run(&bytes, tensor1(&[-1.0f32, 2.0])), vec![0.0, 2.0]);
    }

    #[test]
    fn validate_names_the_problem() {
        let mut g = GraphBuilder::new("bad");
        g.input("x", &[2]).node("Relu", &["nope"], &["y"], []).output("y", &[2]);
        let e = g.validate().unwrap_err();
        assert!(e.to_string().contains("`nope`"), "{e}");

        let mut g = GraphBuilder::new("bad");
        g.input("x", &[2]).node("Relu", &["x"], &["x"], []);
        assert_eq!(g.validate(), Err(GraphError::DuplicateValue { name: "x".into() }));

        let mut g = GraphBuilder::new("bad");
        g.input("x", &[2]).output("z", &[2]);
        assert!(g.validate().unwrap_err().to_string().contains("`z`"));

        let mut g = GraphBuilder::new("bad");
        g.initializer("w", &[2, 2], &[1.0; 3]);
        assert_eq!(g.validate(), Err(GraphError::InitializerSize { name: "w".into(), expected: 4, got: 3 }));
    }
}
