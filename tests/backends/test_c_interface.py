"""The C interface is stated once, in csrc/dsserve_kernels.h: every exported definition in the .c files matches its
declaration there (and none is re-typed elsewhere), the ctypes bindings are the header's, the ctypes structs have
the compiler's layout, and each check reports a header changed under it (a mismatch is memory corruption, not an
error, so the checks must be able to fail)."""

import ctypes
import logging
import re
import subprocess

import pytest

from dsserve.backends.cpu import kernels as cpu_kernels

# a non-static definition of an exported function: its return type, name and parameter list, up to the brace
DEFINITION = re.compile(r"^(?!static\b)([A-Za-z_][\w \t*]*?\b)(dsserve_\w+)\s*\(([^;{}]*?)\)\s*\{", re.M)
# a prototype or struct typedef of the interface outside the header
RETYPED = re.compile(r"^[A-Za-z_][\w \t*]*\bdsserve_\w+\s*\([^;{}]*\)\s*;|^\}\s*dsserve_\w+\s*;", re.M)


def _header_text() -> str:
    return cpu_kernels.HEADER.read_text()


def _definitions() -> dict[str, list[tuple[str, object]]]:
    """Every exported definition in the .c files, parsed as a declaration: name -> [(file, parsed signature)] (a
    function may be defined twice, under #if and #else)."""
    found: dict[str, list[tuple[str, object]]] = {}
    structs = "".join(f"typedef struct {name} {name};" for name in cpu_kernels.c_interface().structs)
    for src in cpu_kernels.SOURCES:
        for ret, name, params in DEFINITION.findall(src.read_text()):
            parsed = cpu_kernels.parse_header(f"{structs}{ret}{name}({params});", src.name).functions[name]
            found.setdefault(name, []).append((src.name, parsed))
    return found


def _mismatches(header: cpu_kernels.CInterface, definitions: dict) -> list[str]:
    """Each way the .c definitions and the header disagree: a function on one side only, a return type, an argument
    count or an argument type."""
    problems = [f"{name} is defined but not declared in the header" for name in definitions.keys() - header.functions]
    generated = {"dsserve_struct_layout"}  # kernels.py generates its definition into the build
    problems += [f"{name} is declared but defined in no .c file"
                 for name in header.functions.keys() - definitions.keys() - generated]
    for name, defined in definitions.items():
        if name not in header.functions:
            continue
        restype, args = header.functions[name]
        for src, (def_restype, def_args) in defined:
            if def_restype != restype:
                problems.append(f"{src}: {name} returns {def_restype}, the header says {restype}")
            if len(def_args) != len(args):
                problems.append(f"{src}: {name} takes {len(def_args)} arguments, the header says {len(args)}")
                continue
            for i, ((_, defined_type), (_, declared_type)) in enumerate(zip(def_args, args)):
                if defined_type != declared_type:
                    problems.append(f"{src}: {name} argument {i}: {defined_type}, the header says {declared_type}")
    return problems


def _binding_mismatches(lib, header: cpu_kernels.CInterface, structs: dict) -> list[str]:
    problems = []
    for name, (restype, args) in header.functions.items():
        fn = getattr(lib, name)
        expected = [cpu_kernels.ctype(spelled, structs) for _, spelled in args]
        if list(fn.argtypes or []) != expected:
            problems.append(f"{name} argtypes {fn.argtypes} != {expected}")
        if fn.restype is not cpu_kernels.ctype(restype, structs):
            problems.append(f"{name} restype {fn.restype}")
    return problems


@pytest.fixture(scope="module")
def lib():
    loaded = cpu_kernels.library()
    if loaded is None:
        pytest.skip(f"the kernels do not build here ({cpu_kernels.why_unavailable()})")
    return loaded


def test_every_definition_matches_its_declaration():
    definitions = _definitions()
    assert "dsserve_paged_decode" in definitions and "dsserve_mla_decode" in definitions  # the regex finds them
    assert len(definitions["dsserve_linear_f16"]) == 2  # the kernel and its stub: both checked
    assert _mismatches(cpu_kernels.c_interface(), definitions) == []


def test_no_prototype_or_struct_is_retyped_outside_the_header():
    for src in cpu_kernels.SOURCES:
        text = src.read_text()
        assert '#include "dsserve_kernels.h"' in text, f"{src.name} does not include the header"
        assert RETYPED.findall(text) == [], f"{src.name} re-types part of the interface"
    assert cpu_kernels.HEADER in cpu_kernels.HEADERS  # it feeds the build hash


@pytest.mark.parametrize("old, new, expected", [
    pytest.param("int64_t dim, float eps);", "int64_t dim, double eps);",
                 "dsserve_rms_norm argument 6: float, the header says double", id="argument-type"),
    pytest.param("const float *sin_table, bool interleaved);", "const float *sin_table, int interleaved);",
                 "dsserve_rotary argument 10: bool, the header says int", id="bool-vs-int"),
    pytest.param("float *out, int64_t rows, int64_t inner);", "float *out, int64_t rows);",
                 "dsserve_silu_mul takes 4 arguments, the header says 3", id="argument-count"),
    pytest.param("int dsserve_pack_f16(const float *w", "int dsserve_pack_f16(float *w",
                 "dsserve_pack_f16 argument 0: const float *, the header says float *", id="const"),
    pytest.param("int64_t dsserve_dense_workspace(", "int dsserve_dense_workspace(",
                 "dsserve_dense_workspace returns int64_t, the header says int", id="return-type"),
    pytest.param("int dsserve_half_supported(void);", "", "dsserve_half_supported is defined but not declared",
                 id="undeclared"),
])
def test_the_checker_reports_a_changed_header(old, new, expected):
    text = _header_text()
    assert old in text
    problems = _mismatches(cpu_kernels.parse_header(text.replace(old, new)), _definitions())
    assert any(expected in problem for problem in problems), problems


def test_bindings_are_the_headers(lib):
    header, structs = cpu_kernels.c_interface(), cpu_kernels._structs()
    assert set(header.functions) >= {"dsserve_paged_decode", "dsserve_linear_f16", "dsserve_dense_decode"}
    assert _binding_mismatches(lib, header, structs) == []
    # the fused decoders' entry points take the header structs, not just any pointer
    assert lib.dsserve_mla_decode.argtypes[2] is ctypes.POINTER(structs["dsserve_mla_step"])
    # negative: a second handle bound from a header with one argument type changed disagrees with the header
    variant = cpu_kernels.parse_header(_header_text().replace("int64_t dim, float eps);", "int64_t dim, double eps);"))
    other = ctypes.CDLL(lib._name)
    cpu_kernels.bind(other, variant, structs)
    assert _binding_mismatches(other, header, structs) == [
        f"dsserve_rms_norm argtypes {other.dsserve_rms_norm.argtypes} != "
        f"{[cpu_kernels.ctype(t, structs) for _, t in header.functions['dsserve_rms_norm'][1]]}"]


def test_struct_layouts_are_the_compilers(lib):
    header, structs = cpu_kernels.c_interface(), cpu_kernels._structs()
    assert set(structs) == {"dsserve_quant_weight", "dsserve_dense_layer", "dsserve_dense_step", "dsserve_mla_layer",
                            "dsserve_mla_step"}
    assert cpu_kernels.layout_mismatches(lib.dsserve_struct_layout, header, structs) == []
    step = structs["dsserve_dense_step"](hidden=64, eps=1e-6, cache_half=1, x=1234)  # filled by field name
    assert (step.hidden, step.cache_half, step.x) == (64, 1, 1234) and abs(step.eps - 1e-6) < 1e-12
    # negative: ctypes structs from a header whose float fields became double are laid out differently
    variant = cpu_kernels.parse_header(_header_text().replace("    float eps, scale;\n", "    double eps, scale;\n"))
    problems = cpu_kernels.layout_mismatches(lib.dsserve_struct_layout, header, cpu_kernels.make_structs(variant))
    assert "dsserve_dense_step sizeof: 168 in ctypes, 160 in C" in problems
    assert any(p.startswith("dsserve_dense_step cache_half:") for p in problems)
    assert not any(p.startswith("dsserve_mla") for p in problems)


def test_the_compiler_rejects_an_undeclared_or_mistyped_definition(tmp_path):
    compiler = cpu_kernels._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    cases = {"undeclared": "int dsserve_new_kernel(int x) { return x; }",
             "mistyped": "int dsserve_silu_mul(const float *gu, float *out, int64_t rows, int32_t inner) "
                         "{ (void)gu, (void)out, (void)rows, (void)inner; return 0; }"}
    for name, code in cases.items():
        src = tmp_path / f"{name}.c"
        src.write_text(f'#include "dsserve_kernels.h"\n{code}\n')
        out = subprocess.run([compiler, "-Werror=missing-prototypes", "-I", str(cpu_kernels.CSRC), "-c", str(src),
                              "-o", str(tmp_path / f"{name}.o")], capture_output=True, text=True)
        assert out.returncode != 0, f"{name}: {code} compiled"


def test_the_header_parser_refuses_what_it_cannot_bind():
    with pytest.raises(cpu_kernels.CInterfaceError, match="does not parse"):
        cpu_kernels.parse_header("int dsserve_broken(int x;")
    with pytest.raises(cpu_kernels.CInterfaceError, match="only function declarations and typedef'd structs"):
        cpu_kernels.parse_header("int dsserve_global;")
    with pytest.raises(cpu_kernels.CInterfaceError, match="ArrayDecl is not a type"):
        cpu_kernels.parse_header("typedef struct { float w[4]; } dsserve_fixed;")
    with pytest.raises(cpu_kernels.CInterfaceError, match="no ctypes type for C type 'long double'"):
        cpu_kernels.make_structs(cpu_kernels.parse_header("typedef struct { long double w; } dsserve_wide;"))


def test_status_says_which_path_runs(lib, monkeypatch):
    status = cpu_kernels.status()
    assert status.is_built and status.why_not is None and status.paged_attention
    assert status.vector_width == lib.dsserve_vector_width()
    assert status.linear_f16 == cpu_kernels.linear_f16_usable()
    assert status.linear_bf16 == cpu_kernels.linear_bf16_usable()
    assert status.paths()["attention"].startswith("C kernel")
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("DSSERVE_CPU_KERNELS", "0")
    off = cpu_kernels.status()
    assert not off.is_built and off.why_not == "DSSERVE_CPU_KERNELS=0" and not off.fused_decode
    assert off.paths() == {"attention": "torch (gathered copy of the cache)",
                           "linears": "float16 FBGEMM, bfloat16 and float32 oneDNN",
                           "decode": "per-layer torch modules"}


def test_a_library_that_disagrees_with_the_header_is_reported_once(lib, monkeypatch, caplog):
    """The cached library loads, but the ctypes structs are not the compiler's: no kernel runs, one warning."""
    variant = cpu_kernels.parse_header(_header_text().replace("    float eps, scale;\n", "    double eps, scale;\n"))
    monkeypatch.setattr(cpu_kernels, "_structs", lambda: cpu_kernels.make_structs(variant))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.logger.name):
        assert cpu_kernels.library() is None
        assert cpu_kernels.library() is None
    warnings = [r.getMessage() for r in caplog.records if "CPU kernels unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "disagree with the compiled library" in warnings[0]
    assert "dsserve_dense_step sizeof" in cpu_kernels.status().why_not
